"""Run a bench probe's variants each in its own process (an illegal memory access, a hang or
MLX's in-memory caches stay with the variant that caused them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_variants(script: str, variants: list[str], timeout: float, out_name: str, extra_args=()) -> list[dict]:
    """`script --child=VARIANT [extra_args]` per variant; the child prints "RESULT <json>". Prints
    one row per variant and, with $OUT set, rewrites $OUT/<out_name> after each."""
    rows = []
    for variant in variants:
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, script, f"--child={variant}", *extra_args], capture_output=True,
                                  text=True, timeout=timeout)
            result = next((json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")),
                          None)
            row = {"variant": variant, "rc": done.returncode, "ok": result is not None, **(result or {}),
                   "stderr_tail": done.stderr[-600:] if result is None else ""}
        except subprocess.TimeoutExpired:
            row = {"variant": variant, "rc": None, "ok": False, "stderr_tail": f"timed out after {timeout} s"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], out_name).write_text(json.dumps(rows, indent=1))
    return rows
