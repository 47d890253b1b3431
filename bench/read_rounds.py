"""Read a GPU call's A/B rounds: the `ours_NAME_N.json` rows that `gpu_session.sh`'s env_rows wrote
(one bench_train.py process each), grouped by NAME.

    python bench/read_rounds.py bench/raw/run21/s21 --against bf16

For each group: every process's median s/step, the median of those, and the floor: the lowest median of
WINDOW consecutive steps in any of its processes. On the H100s of runs 20-21 a process's steps moved
between levels by up to 50% while it ran (bench/NOTES.md item 48), so one process's median says as much
about the machine as about the code; the floor is the level the step reaches when the host is quiet,
and the steadier number to compare. With --against, each group's ratio to that group by medians and by
floors, and round by round where both have a row of the same number N.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_train import steady_intervals  # noqa: E402

ROW_NAME = re.compile(r"^ours_(?P<group>.+?)_(?P<round>\d+)\.json$")


def floor(intervals: list[float], window: int) -> float:
    """The lowest median of `window` consecutive intervals (all of them where there are fewer)."""
    if len(intervals) <= window:
        return statistics.median(intervals)
    return min(statistics.median(intervals[i:i + window]) for i in range(len(intervals) - window + 1))


def read(folder: Path, window: int) -> dict[str, dict[int, dict]]:
    """{group: {round: {"median", "floor", "peak_gib"}}} from the folder's rows (errors left out)."""
    groups: dict[str, dict[int, dict]] = {}
    for path in sorted(folder.glob("ours_*.json")):
        match = ROW_NAME.match(path.name)
        if not match:
            continue
        rows = [row for row in json.loads(path.read_text()) if "error" not in row]
        if not rows:
            continue
        row = rows[0]
        steps = steady_intervals(row.get("s_per_step_each") or [row["s_per_step_median"]])
        groups.setdefault(match["group"], {})[int(match["round"])] = {
            "median": statistics.median(steps), "floor": floor(steps, window), "peak_gib": row.get("peak_gib")}
    return groups


def summary(groups: dict[str, dict[int, dict]], against: str | None) -> list[dict]:
    lines = []
    reference = groups.get(against) if against else None
    if against and reference is None:
        raise SystemExit(f"no rows named ours_{against}_N.json in that folder; groups: {', '.join(sorted(groups))}")
    if reference:
        ref_median = statistics.median(r["median"] for r in reference.values())
        ref_floor = min(r["floor"] for r in reference.values())
    for name, rounds in sorted(groups.items()):
        medians = [rounds[n]["median"] for n in sorted(rounds)]
        peaks = [rounds[n]["peak_gib"] for n in sorted(rounds) if rounds[n]["peak_gib"] is not None]
        line = {"group": name, "processes": len(rounds), "medians": [round(m, 4) for m in medians],
                "median": round(statistics.median(medians), 4),
                "floor": round(min(r["floor"] for r in rounds.values()), 4),
                "peak_gib": [min(peaks), max(peaks)] if peaks else None}
        if reference and name != against:
            line["ratio_by_medians"] = round(line["median"] / ref_median, 3)
            line["ratio_by_floors"] = round(line["floor"] / ref_floor, 3)
            line["ratio_by_round"] = {n: round(rounds[n]["median"] / reference[n]["median"], 3)
                                      for n in sorted(rounds) if n in reference}
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--against", help="the group the others are divided by (bf16 in gpu_session.sh's rounds)")
    parser.add_argument("--window", type=int, default=3, help="consecutive steps a floor is the median of")
    args = parser.parse_args()
    if not args.folder.is_dir():
        raise SystemExit(f"{args.folder} is not a folder: give the one a gpu_session.sh part wrote its rows to")
    groups = read(args.folder, args.window)
    if not groups:
        raise SystemExit(f"no ours_NAME_N.json rows in {args.folder}")
    for line in summary(groups, args.against):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
