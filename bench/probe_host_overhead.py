"""The host's time to build one block-by-block training step's graphs, nothing evaluated: full FLUX.1 depth
(19 + 38 blocks) at a small width, so the time is the host's alone (Python, the stages' parameter trees,
MLX's compiled-function calls), which does not depend on the width. For bench/NOTES.md's GPU idle in the
checkpointed 4-bit step: at depth -1 MLX keeps only ~10 small CUDA graphs in flight (~1 ms of GPU work),
so host work between queueing two stages that takes longer than that leaves the GPU idle.

    python bench/probe_host_overhead.py --template people --quantize 4 [--steps 5]

Prints one JSON line: seconds per step to build the graphs (median), per stage queued, and each kind of
stage function's call (forward or backward, by what it runs) in ms, the first call (tracing) left out."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402,F401  (preloads the BLAS before mlx)
import mlx.core as mx  # noqa: E402

from collections import defaultdict  # noqa: E402

from bench.count_step_kernels import full_depth_model, step_arrays  # noqa: E402
from engine import blockwise_step  # noqa: E402
from engine.training_step import make_train_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", default="people")
    parser.add_argument("--quantize", type=int, choices=[4, 8])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--width", type=int, default=256, help="heads x 128 (FLUX.1: 3072)")
    parser.add_argument("--switch", action="append", default=[], metavar="NAME=0|1")
    args = parser.parse_args()
    transformer, optimizer = full_depth_model(args.template, args.quantize, args.width, True, args.switch)

    queued, pushes = [], [0]

    def push(self, arrays):
        pushes[0] += 1
        queued.append(arrays)

    blockwise_step.BoundedQueue.push = push
    blockwise_step.BoundedQueue.drain = lambda self: None
    calls = defaultdict(list)  # (direction, what the stage runs) -> seconds of each call after its first
    get = blockwise_step._Functions._get

    def timed_get(self, key, make):
        function = get(self, key, make)
        kind = f"{key[0]} {getattr(key[1][0], '__name__', key[1][0])}"

        def timed(*arguments):
            started = time.perf_counter()
            out = function(*arguments)
            calls[kind].append(time.perf_counter() - started)
            return out
        return timed

    blockwise_step._Functions._get = timed_get
    step = make_train_step(transformer, optimizer, mx.bfloat16, has_guidance=True, blockwise_depth=1)
    arrays = step_arrays()
    builds = []
    for i in range(args.steps + 1):  # the first call traces and compiles: not counted
        pushes[0] = 0
        started = time.perf_counter()
        loss = step(*arrays)
        built = time.perf_counter() - started
        mx.eval(queued, loss, transformer.state, optimizer.state)  # not timed: keeps the graphs from growing
        queued.clear()
        if i:
            builds.append(built)
    build = statistics.median(builds)
    print(json.dumps({"template": args.template, "quantize": args.quantize, "switches": args.switch,
                      "build_s_per_step": round(build, 5), "stage_pushes": pushes[0],
                      "build_ms_per_push": round(1e3 * build / max(pushes[0], 1), 3),
                      "call_ms": {kind: round(1e3 * statistics.median(times[1:]), 3)
                                  for kind, times in sorted(calls.items()) if len(times) > 1},
                      "device": str(mx.default_device())}))


if __name__ == "__main__":
    main()
