"""Build bench/results.json from the raw rows of a GPU run (bench/raw/<run>/).

    python bench/make_results.py [--run run16] [--fallback-runs run15 run14 run13 run13_h100 run12 run11 run9 run2 run1]

Ours, diffusers+peft and mflux rows are joined on (template, quantize,
checkpointing). Peer rows come from the same run wherever that run measured
them; `*_source` names the run of each number, so cross-run numbers are
visible as such. Each run's card and date are in its folder's run.json; a row
takes those of our number. Our seconds per step are the median of a row's
step intervals without the last (bench_train.steady_intervals), recomputed
from `s_per_step_each` where a row has it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.bench_train and engine, imported where used

RAW = Path(__file__).resolve().parent / "raw"
PEER_TEMPLATE = {"pets_r4": "pets", "people_r8": "people", "style_r16": "style"}


def load_rows(folder: Path, prefix: str) -> list[dict]:
    rows = []
    for path in sorted(folder.glob(f"{prefix}*.json*")):
        text = path.read_text()
        if path.suffix == ".jsonl":
            rows += [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            rows += data if isinstance(data, list) else [data]
    return [row for row in rows if "error" not in row]


def key(row: dict) -> tuple:
    template = PEER_TEMPLATE.get(row["template"], row["template"])
    return template, row.get("quantize"), bool(row.get("checkpointing"))


def run_info(name: str) -> dict:
    return json.loads((RAW / name / "run.json").read_text())


def ours_seconds(row: dict) -> float:
    each = row.get("s_per_step_each")
    if not each:
        return row["s_per_step_median"]
    from bench.bench_train import steady_intervals

    return round(statistics.median(steady_intervals(each)), 4)


# rows measured with routes the engine no longer takes, said in results.json
ROW_NOTES = {
    ("run12", "style", 8): "joint blocks on the recomputed attention backward (before the contiguous route, "
                           "0.07 s faster in bf16) and capped at the estimate",
    ("run12", "style", 4, True): "our CUDA kernels (LoRA, RoPE, GELU) were off for it then; the engine now keeps "
                                 "them on (run 12 trained bf16 style checkpointed with them)",
    ("run12", "pets", 8, True): "checkpointing as one graph capped at the estimate, before the block-by-block step",
    ("run12", "people", 8, True): "checkpointing as one graph capped at the estimate, before the block-by-block step",
    ("run12", "style", 8, True): "checkpointing as one graph capped at the estimate, before the block-by-block step; "
                                 "joint blocks on the recomputed attention backward",
    ("run13", "pets", 4, True): "block-by-block step queueing 2 stages ahead (the default is now 1: people held "
                                "0.96 GiB less with 1, run 13); estimates for the depth it ran at",
    ("run13", "style", 4, True): "block-by-block step queueing 2 stages ahead (the default is now 1: people held "
                                 "0.96 GiB less with 1, run 13); estimates for the depth it ran at",
    **{("run13_h100", template, None, True): "block-by-block step queueing 2 stages ahead (the default is now 1); "
                                             "estimates for that depth; on an H100 that ran bf16 without "
                                             "checkpointing 9-25% slower than run 12's"
       for template in ("pets", "people", "style")},
    **{("run14", template, quantize, True): "block-by-block step at depth 1 waiting before it queued each stage "
                                            "(changed back after this run: people 4-bit held 9.09-9.58 GiB that way, "
                                            "8.67 GiB at 0.157 s waiting after, run 13)"
       for template in ("pets", "people", "style") for quantize in (None, 4, 8)},
}
# the block-by-block step's depth (engine/flux/speed.py: BLOCKWISE_DEPTH) where a run's rows did not set it:
# 2 in run 13, 1 until run 18 made CUDA's -1 (run 18's rows all name theirs; later rows that name none
# ran at CUDA's default)
DEPTH_AT_RUN = {"run13": 2, "run13_h100": 2}
DEPTH_BEFORE_RUN18 = 1


def index(rows: list[dict], source: str) -> dict:
    return {key(row): dict(row, source=source) for row in rows}


def current_estimate(template: str, quantize, checkpointing: bool, depth: int | None = None) -> float:
    """The estimator's prediction now, for the bench's configuration (transformer + LoRA step, CUDA),
    with the block-by-block step queueing `depth` stages (None: the engine's default)."""
    from bench.bench_train import estimate_gib
    from engine.config import load_template
    from engine.flux import speed

    default = speed.BLOCKWISE_DEPTH
    speed.BLOCKWISE_DEPTH = default if depth is None else depth
    try:
        return estimate_gib(load_template(template), quantize, checkpointing, 512)[0]
    finally:
        speed.BLOCKWISE_DEPTH = default


def row_depth(row: dict) -> int | None:
    depth = (row.get("switches_set") or {}).get("BLOCKWISE_DEPTH")
    if depth is not None:
        return depth
    if row["source"] in DEPTH_AT_RUN:
        return DEPTH_AT_RUN[row["source"]]
    if int(row["source"].split("_")[0].removeprefix("run")) < 18:  # run13_h100 -> 13
        return DEPTH_BEFORE_RUN18
    from engine.flux import speed

    return speed.BLOCKWISE_DEPTH_ON_CUDA  # from run 18 on, a row that names no depth ran at CUDA's default


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="run16")
    parser.add_argument("--fallback-runs", nargs="*",
                        default=["run15", "run14", "run13", "run13_h100", "run12", "run11", "run9", "run2", "run1"],
                        help="raw folders for what the main run did not measure, first = preferred")
    args = parser.parse_args()
    ours, diffusers, mflux = {}, {}, {}
    for name in [*reversed(args.fallback_runs), args.run]:  # configs the main run lacks come from earlier runs
        ours.update(index(load_rows(RAW / name, "ours"), name))
    for name in [*reversed(args.fallback_runs), args.run]:  # later (preferred) runs overwrite
        diffusers.update(index(load_rows(RAW / name, "peer_diffusers"), name))
        mflux.update(index(load_rows(RAW / name, "peer_mflux"), name))
    rows = []
    for config in sorted(ours, key=lambda k: (str(k[1]), k[0], k[2])):
        template, quantize, checkpointing = config
        mine = ours[config]
        peer = diffusers.get(config) if quantize is None else None
        other = mflux.get((template, quantize, False)) if not checkpointing else None
        rows.append({
            "card": run_info(mine["source"])["card"], "date": run_info(mine["source"])["date"],
            "template": template, "quantize": quantize, "checkpointing": checkpointing,
            "ours_s_per_step": ours_seconds(mine),
            "peer_s_per_step": round(peer["s_per_step_median"], 4) if peer else None,
            "mflux_s_per_step": other["s_per_step_median"] if other else None,
            "ours_peak_gib": mine["peak_gib"],
            "peer_peak_gib": peer["peak_gib"] if peer else None,
            "mflux_peak_gib": other["peak_gib"] if other else None,
            "estimate_gib": current_estimate(template, quantize, checkpointing, row_depth(mine)),
            "estimate_gib_at_run": mine.get("estimate_gib"),
            "peer_source": peer["source"] if peer else None,
            "mflux_source": other["source"] if other else None,
            "ours_source": mine["source"],
            "ours_losses_finite": mine.get("losses_finite"),  # None: that run did not record its losses
        })
        note = ROW_NOTES.get((mine["source"], template, quantize, checkpointing)) or ROW_NOTES.get(
            (mine["source"], template, quantize))
        if note:
            rows[-1]["ours_note"] = note
        for name, other_row in (("peer", peer), ("mflux", other)):
            if other_row and other_row["source"] != mine["source"]:
                rows[-1][f"{name}_note"] = (f"from {other_row['source']} ({run_info(other_row['source'])['card']}), "
                                            f"not the run of ours: not a same-run ratio")
        if template == "style" and mine.get("losses_finite") is None:
            rows[-1]["ours_note"] = ("timed before the fix of run 10, which found this template's bf16 gradients "
                                     "NaN on CUDA (bench/NOTES.md, item 14)")
    ttfs_run = next(name for name in [args.run, *args.fallback_runs] if (RAW / name / "ttfs.json").is_file())
    ttfs = json.loads((RAW / ttfs_run / "ttfs.json").read_text())
    result = {"rows": rows, "time_to_first_step_s": ttfs["time_to_first_step_s"],
              "time_to_first_step": dict(ttfs, source=ttfs_run)}
    # a first run without the kernel warm-up: the latest run that measured one (its source says which)
    baseline_run = next((name for name in [ttfs_run, *args.fallback_runs]
                         if (RAW / name / "ttfs_without_warmup.json").is_file()), None)
    if baseline_run:
        baseline = json.loads((RAW / baseline_run / "ttfs_without_warmup.json").read_text())
        result["time_to_first_step_without_warmup_s"] = baseline["time_to_first_step_s"]
        result["time_to_first_step_without_warmup"] = dict(baseline, source=baseline_run)
    # a second run, MLX's kernel cache filled by the first: the latest run that measured one
    warm_run = next((name for name in [args.run, *args.fallback_runs] if (RAW / name / "ttfs_warm.json").is_file()), None)
    if warm_run:
        warm = json.loads((RAW / warm_run / "ttfs_warm.json").read_text())
        result["time_to_first_step_warm_cache_s"] = warm["time_to_first_step_s"]
        result["time_to_first_step_warm_cache"] = dict(warm, source=warm_run)
    out = Path(__file__).resolve().parent / "results.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
