"""GPU probe: where a training step's time goes, kernel by kernel.

Runs our compiled LoRA step (engine/training_step.py) on full-size FLUX.1-dev
with random weights, 512x512, and records every CUDA kernel the process
launches with PyTorch's profiler (CUPTI sees MLX's kernels too: same process,
same device). Per variant it prints the wall time per step, the time the GPU
was busy, and the kernels grouped by kind (matmul, attention, dequantize,
fused elementwise, copies, reductions...). Variants flip the engine's speed
switches (engine/flux/speed.py) so their effect is measured in one process.

    python bench/profile_step.py [--variants pets-bf16 pets-q4 ...] [--steps 3]
With $OUT set, writes $OUT/profile.json. Needs torch with CUDA (the device has it).
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402,F401
import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402

from bench.bench_train import (DEFAULT_MEMORY_LIMIT, SMALL, build_transformer, clamp_targets,  # noqa: E402
                               estimate_gib, step_intervals)
from bench.probe_memory import inputs  # noqa: E402
from engine.config import load_template, lora_targets  # noqa: E402
from engine.flux import speed  # noqa: E402
from engine.lora import apply_lora, remove_lora  # noqa: E402
from engine.training_step import make_train_step  # noqa: E402

KINDS = [
    ("attention", r"sdpa|flash|attention|fmha|cudnn"),
    ("matmul", r"gemm|cutlass|sm90|sm100|xmma|nvjet|cublas|matmul|Kernel2"),
    ("quantized matmul", r"qmm|qmv|quantized_matmul|affine_qmm"),
    ("dequantize", r"dequant"),
    ("fused elementwise", r"^(?:void )?(?:mlx::core::cu::)?Compiled|compiled|fused"),
    ("copy / transpose", r"copy|transpose|gather|scatter|concatenate|slice"),
    ("reduction / norm", r"reduce|norm|softmax|sum|layer_norm|rms"),
    ("elementwise", r"binary|unary|ternary|elementwise|fill|arange|rope"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def kernel_profile(run_steps, steps: int) -> dict:
    """Run `run_steps(steps)` under the torch profiler; kernels grouped by kind, per step."""
    try:
        import torch
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
    except ImportError as error:
        return {"error": f"no torch profiler: {error}"}
    torch.cuda.init()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run_steps(steps)
        wall = time.perf_counter() - start
    # the host's ranges (host_ranges) come back as GPU-side annotations too: not kernels (run 23's profile
    # counted them as such, its busy and idle times are wrong)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.name.startswith("dbw ")]
    if not kernels:
        return {"error": "the profiler saw no kernels", "wall_s_per_step": wall / steps}
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, current_start, current_end = 0.0, *spans[0]
    for begin, end in spans[1:]:
        if begin > current_end:
            busy += current_end - current_start
            current_start, current_end = begin, end
        else:
            current_end = max(current_end, end)
    busy += current_end - current_start
    by_kind, by_name, counts = defaultdict(float), defaultdict(float), defaultdict(int)
    for e in kernels:
        duration = e.time_range.end - e.time_range.start
        by_kind[kind_of(e.name)] += duration
        by_name[e.name[:140]] += duration
        counts[e.name[:140]] += 1
    top = sorted(by_name.items(), key=lambda item: -item[1])[:30]
    host = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
            if e.device_type == DeviceType.CPU and e.name.startswith("dbw ")]
    gaps = idle_gaps([(e.time_range.start, e.time_range.end, e.name) for e in kernels], steps, host=host or None)
    api = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
           if e.device_type == DeviceType.CPU and e.name.startswith("cu")]
    return {
        "wall_s_per_step": round(wall / steps, 4),
        "gpu_busy_s_per_step": round(busy / 1e6 / steps, 4),
        "kernels_per_step": len(kernels) // steps,
        "span_s_per_step": round((spans[-1][1] - spans[0][0]) / 1e6 / steps, 4),
        "by_kind_ms_per_step": {k: round(v / 1e3 / steps, 2) for k, v in sorted(by_kind.items(), key=lambda i: -i[1])},
        "top_kernels": [{"name": n, "ms_per_step": round(t / 1e3 / steps, 3), "count_per_step": counts[n] // steps}
                        for n, t in top],
        "idle": gaps,
        "host": host_time(host, api, steps),
    }


def host_time(ranges: list[tuple[float, float, str]], api: list[tuple[float, float, str]], steps: int,
              top: int = 10) -> dict:
    """Where the host's time goes, per step: each kind of the step's ranges (`host_ranges`; a queueing
    holds MLX's encoding of the stage's kernels, the step's range holds the others), and the CUDA API
    calls CUPTI saw (MLX's graph launches, updates and instantiations among them) by name, in ms and
    count; and for a queueing, the us from its start to its first graph launch (MLX walking the stage's
    graph and encoding its first CUDA graph, which the GPU waits for when it has run dry)."""
    def per_step(items):
        table = defaultdict(lambda: [0.0, 0])
        for start, end, name in items:
            table[name][0] += end - start
            table[name][1] += 1
        rows = sorted(table.items(), key=lambda item: -item[1][0])[:top]
        return {name: {"ms": round(total / 1e3 / steps, 3), "count": round(n / steps, 1)} for name, (total, n) in rows}

    launches = sorted(start for start, _, name in api if "GraphLaunch" in name or "LaunchKernel" in name)
    firsts = []
    for start, end, name in ranges:
        if name == "dbw queue":
            at = bisect.bisect_left(launches, start)
            if at < len(launches) and launches[at] <= end:
                firsts.append(launches[at] - start)
    return {"ranges": per_step(ranges), "api": per_step(api),
            "queue_to_first_launch_us": {"median": round(statistics.median(firsts), 1),
                                         "mean": round(statistics.fmean(firsts), 1), "count": len(firsts)} if firsts else None}


GAP_BINS_US = (5, 20, 100, 1000)


def idle_gaps(kernels: list[tuple[float, float, str]], steps: int, top: int = 12,
              host: list[tuple[float, float, str]] | None = None) -> dict:
    """Where the GPU waited: every stretch with no kernel running between the first kernel's start
    and the last one's end, from (start_us, end_us, name) of each kernel. Per step: the idle ms, the
    gaps by length (ms and count per bin of GAP_BINS_US), and the kernels each gap came after and
    before (by name, ms of idle and count), which tell the stage where the host fell behind: at depth
    -1 MLX holds only ~10 graphs in flight, so the GPU waits wherever the host's work between two
    launches outlasts that queue (bench/NOTES.md items 40, 49). With `host`, (start_us, end_us, name)
    ranges of what the host was doing (`host_ranges`), each gap of 20 us or more is also counted
    under the innermost range running at its middle ("while"): a compiled call, a queueing, the
    step's own Python, or nothing of the step's (the caller, between steps)."""
    ordered = sorted(kernels)
    bins = {f"<{b}us": [0.0, 0] for b in GAP_BINS_US}
    bins[f">={GAP_BINS_US[-1]}us"] = [0.0, 0]
    after, before = defaultdict(lambda: [0.0, 0]), defaultdict(lambda: [0.0, 0])
    during = defaultdict(lambda: [0.0, 0])
    idle, (_, reach, last) = 0.0, ordered[0] if ordered else (0.0, 0.0, "")
    for start, end, name in ordered[1:]:
        if start > reach:
            gap = start - reach
            idle += gap
            label = next((f"<{b}us" for b in GAP_BINS_US if gap < b), f">={GAP_BINS_US[-1]}us")
            for table, key in ((bins, label), (after, last[:100]), (before, name[:100])):
                table[key][0] += gap
                table[key][1] += 1
            if host is not None and gap >= 20:
                middle = (reach + start) / 2
                inside = [r for r in host if r[0] <= middle <= r[1]]
                key = min(inside, key=lambda r: r[1] - r[0])[2] if inside else "(no range: between steps)"
                during[key][0] += gap
                during[key][1] += 1
        if end >= reach:
            reach, last = end, name

    def per_step(table, limit=None):
        rows = sorted(table.items(), key=lambda item: -item[1][0])[:limit] if limit else table.items()
        return [{"name": key, "ms_per_step": round(total / 1e3 / steps, 3), "count_per_step": round(n / steps, 1)}
                for key, (total, n) in rows]

    result = {"idle_ms_per_step": round(idle / 1e3 / steps, 2), "by_length": per_step(bins),
              "after": per_step(after, top), "before": per_step(before, top)}
    if host is not None:
        result["while"] = per_step(during, top)
    return result


# whether profiles record the host's ranges (--no-host-ranges: not). Each range costs the host a few us
# (~3000 a 4-bit checkpointed step), so a profile with them waits a little more for the host than without
HOST_RANGES = True


@contextmanager
def host_ranges():
    """While profiling: each compiled-function call (a stage's forward or backward, the update, a
    one-graph step), each queueing of a stage (BoundedQueue.push, mx.async_eval) and each step as a
    whole show as ranges of the host in the torch profiler ("dbw ..."), for `idle_gaps`' "while"."""
    import torch

    from engine import blockwise_step

    def named(function, name):
        def call(*args, **kwargs):
            with torch.profiler.record_function(name):
                return function(*args, **kwargs)
        return call

    def label(function) -> str:
        inner = getattr(function, "func", function)  # a stage function is a partial of _forward/_backward
        run = function.args[1] if getattr(function, "args", None) and len(function.args) > 1 else None
        return f"dbw call {getattr(inner, '__name__', '?').strip('_')} {getattr(run, '__name__', '')}".strip()

    real_compile, real_push, real_async_eval = mx.compile, blockwise_step.BoundedQueue.push, mx.async_eval
    real_make = blockwise_step.make_blockwise_step
    mx.compile = lambda function=None, **kw: (  # noqa: E731  (also used as a decorator with keywords)
        (lambda f: named(real_compile(f, **kw), label(f))) if function is None else named(real_compile(function, **kw), label(function)))
    blockwise_step.BoundedQueue.push = lambda self, arrays: named(real_push, "dbw queue")(self, arrays)
    mx.async_eval = named(real_async_eval, "dbw queue")

    def make(*args, **kwargs):
        return named(real_make(*args, **kwargs), "dbw step (its Python)")
    blockwise_step.make_blockwise_step = make
    try:
        yield
    finally:
        mx.compile, blockwise_step.BoundedQueue.push, mx.async_eval = real_compile, real_push, real_async_eval
        blockwise_step.make_blockwise_step = real_make


def run_variant(transformer, template: str, quantize, checkpointing: bool, switches: dict, cap: bool,
                steps: int, profile: bool) -> dict:
    for name, value in switches.items():
        setattr(speed, name, value)
    transformer.gradient_checkpointing = checkpointing
    limit = None
    if cap is True:
        _, _, limit = estimate_gib(load_template(template), quantize, checkpointing, 64 if SMALL else 512)
    elif cap:
        limit = int(cap * 2**30)
    mx.set_memory_limit(limit or DEFAULT_MEMORY_LIMIT)
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(transformer.trainable_parameters())
    with ExitStack() as ranges:
        if profile and HOST_RANGES:  # the host's ranges for the profile's idle gaps, from the step's making on
            ranges.enter_context(host_ranges())
        return _run_variant(transformer, template, quantize, checkpointing, switches, cap, steps, profile,
                            limit, make_train_step(transformer, optimizer, mx.float32 if SMALL else mx.bfloat16, True))


def _run_variant(transformer, template, quantize, checkpointing, switches, cap, steps, profile, limit, step) -> dict:
    arrays = inputs()

    def run_steps(count):
        step_intervals(lambda index: step(*arrays), 0, count - 1)

    mx.clear_cache()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    times = step_intervals(lambda index: step(*arrays), 3, steps)
    row = {"template": template, "quantize": quantize, "checkpointing": checkpointing, "cap": cap,
           "switches": dict(switches), "s_per_step_median": round(sorted(times)[len(times) // 2], 4),
           "peak_gib": round(mx.get_peak_memory() / 2**30, 2), "resident_gib": round(resident / 2**30, 2),
           "memory_limit_gib": round(limit / 2**30, 2) if limit else None}
    if profile:
        row["profile"] = kernel_profile(run_steps, 2)
    for name in switches:
        setattr(speed, name, speed.DEFAULTS[name])
    return row


def matmul_probe(repeats: int = 20, dim: int = 3072, tokens: int = 1536) -> list[dict]:
    """Single-block input projections, forward + backward to the input (no weight gradient):
    q, k, v and proj_mlp as four matmuls vs one fused 3072 x 21504 matmul, bf16 and 4-bit."""
    from engine.flux.quantized import dequantized_matmul

    rows = []
    x = mx.random.normal((tokens, dim)).astype(mx.bfloat16)
    widths = {"separate": [dim, dim, dim, 4 * dim], "fused": [7 * dim]}
    for bits in (None, 4):
        for layout, outs in widths.items():
            weights = [(mx.random.normal((n, dim)) * 0.02).astype(mx.bfloat16) for n in outs]
            if bits:
                weights = [mx.quantize(w, 64, bits) for w in weights]
                matmul = dequantized_matmul(64, bits, "affine")

                def forward(v, weights=weights, matmul=matmul):
                    return [matmul(v, *w) for w in weights]
            else:
                def forward(v, weights=weights):
                    return [v @ w.T for w in weights]
            cotangents = [mx.random.normal((tokens, n)).astype(mx.bfloat16) for n in outs]
            mx.eval(weights, cotangents)

            def loss(v, forward=forward, cotangents=cotangents):
                return sum((y * c).sum() for y, c in zip(forward(v), cotangents))

            for mode, fn in (("forward", mx.compile(forward)), ("forward+backward", mx.compile(mx.grad(loss)))):
                for _ in range(3):
                    mx.eval(fn(x))
                start = time.perf_counter()
                for _ in range(repeats):
                    mx.eval(fn(x))
                rows.append({"bits": bits, "layout": layout, "mode": mode,
                             "ms": round((time.perf_counter() - start) / repeats * 1e3, 3)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def rope_probe(repeats: int = 50) -> dict:
    """engine/flux/rope.py's CUDA kernel against its float32 route: values, gradients, time."""
    from engine.flux.rope import apply_rope, rope_inverse_frequencies, rope_rotation
    from engine.flux.latents import latent_image_ids, text_ids
    from engine.flux.transformer import _join_ids

    frequencies, axis_of_pair = rope_inverse_frequencies([16, 56, 56])
    rotation = rope_rotation(_join_ids(text_ids(512), latent_image_ids(64, 64)), frequencies, axis_of_pair)
    x = mx.random.normal((1, 1536, 24, 128)).astype(mx.bfloat16)
    cotangent = mx.random.normal(x.shape).astype(mx.bfloat16)
    grad = mx.grad(lambda v: (apply_rope(v, rotation) * cotangent).astype(mx.float32).sum())
    row, results = {}, {}
    for kernel in (True, False):
        speed.ROPE_KERNEL = kernel
        results[kernel] = [apply_rope(x, rotation), grad(x)]
        forward = mx.compile(lambda v: apply_rope(v, rotation))
        mx.eval(forward(x))
        start = time.perf_counter()
        outs = [forward(x) for _ in range(repeats)]
        mx.eval(outs)
        row[f"forward_us_{'kernel' if kernel else 'float32'}"] = round((time.perf_counter() - start) / repeats * 1e6, 1)
    speed.ROPE_KERNEL = True
    for name, ours, reference in zip(("value", "grad"), results[True], results[False]):
        ours, reference = ours.astype(mx.float32), reference.astype(mx.float32)
        row[f"rel_{name}"] = float(mx.abs(ours - reference).max() / mx.abs(reference).max())
    print(json.dumps(row), flush=True)
    return row


def dequantize_probe(repeats: int = 50) -> list[dict]:
    """Our CUDA dequantize kernel against mx.dequantize: largest difference and time per call."""
    from engine.flux.quantized import dequantize

    rows = []
    for out_dim, in_dim in ((3072, 3072), (12288, 3072), (3072, 15360), (18432, 3072)):
        weight = (mx.random.normal((out_dim, in_dim)) * 0.05).astype(mx.bfloat16)
        for bits in (4, 8):
            wq, scales, biases = mx.quantize(weight, 64, bits)
            mx.eval(wq, scales, biases)
            row = {"shape": [out_dim, in_dim], "bits": bits}
            ours, stock = dequantize(wq, scales, biases, 64, bits, "affine"), mx.dequantize(wq, scales, biases, 64, bits)
            row["max_abs_diff"] = float(mx.abs(ours.astype(mx.float32) - stock.astype(mx.float32)).max())
            row["max_abs"] = float(mx.abs(stock.astype(mx.float32)).max())
            for name, fn in (("ours_us", lambda: dequantize(wq, scales, biases, 64, bits, "affine")),
                             ("stock_us", lambda: mx.dequantize(wq, scales, biases, 64, bits))):
                mx.eval(fn())
                start = time.perf_counter()
                outs = [fn() for _ in range(repeats)]
                mx.eval(outs)
                row[name] = round((time.perf_counter() - start) / repeats * 1e6, 1)
                del outs
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def lora_kernel_probe(repeats: int = 50) -> list[dict]:
    """engine/lora_kernels.py on CUDA against the same products through MLX matmuls: the largest
    relative difference of each product and of a LoRA layer's gradients, and the time of one
    layer's update forward + backward each way."""
    from engine import lora_kernels as lk

    rows = []
    tokens = 1536
    for in_dim, out_dim, rank in ((3072, 3072, 4), (3072, 12288, 4), (15360, 3072, 8), (3072, 3072, 16)):
        keys = mx.random.split(mx.random.key(in_dim + out_dim + rank), 5)
        x = mx.random.normal((1, tokens, in_dim), key=keys[0]).astype(mx.bfloat16)
        y = mx.random.normal((1, tokens, out_dim), key=keys[1]).astype(mx.bfloat16)
        lora_A = mx.random.normal((rank, in_dim), key=keys[2]) * 0.02
        lora_B = mx.random.normal((out_dim, rank), key=keys[3]) * 0.02
        cotangent = mx.random.normal((1, tokens, out_dim), key=keys[4]).astype(mx.bfloat16)
        z = lk.skinny_matmul(x, lora_A)
        grad = mx.grad(lambda y, x, a, b: (lk.lora_update(y, x, a, b) * cotangent).astype(mx.float32).sum(),
                       argnums=(0, 1, 2, 3))
        results = {}
        for kernels in (True, False):
            speed.LORA_KERNELS = kernels
            results[kernels] = [lk.skinny_matmul(x, lora_A), lk.skinny_matmul(cotangent, lora_B, transposed=True),
                                lk.add_low_rank(y, z, lora_B), lk.add_low_rank(None, z, lora_A, transposed=True),
                                lk.reduce_outer(z, x), *grad(y, x, lora_A, lora_B)]
            mx.eval(results[kernels])
            step = mx.compile(grad)
            mx.eval(step(y, x, lora_A, lora_B))
            start = time.perf_counter()
            outs = [step(y, x, lora_A, lora_B) for _ in range(repeats)]
            mx.eval(outs)
            results[f"us_{kernels}"] = round((time.perf_counter() - start) / repeats * 1e6, 1)
            del outs
        speed.LORA_KERNELS = speed.DEFAULTS["LORA_KERNELS"]
        names = ["skinny", "skinny_transposed", "add_low_rank", "add_low_rank_transposed_no_c", "reduce_outer",
                 "grad_y", "grad_x", "grad_A", "grad_B"]
        row = {"in": in_dim, "out": out_dim, "rank": rank,
               "layer_fwd_bwd_us_kernels": results["us_True"], "layer_fwd_bwd_us_matmuls": results["us_False"]}
        for name, ours, reference in zip(names, results[True], results[False]):
            ours, reference = ours.astype(mx.float32), reference.astype(mx.float32)
            row[f"rel_{name}"] = float(mx.abs(ours - reference).max() / (mx.abs(reference).max() + 1e-12))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# name -> (template, quantize, checkpointing, switches, cap, profile)
VARIANTS = {
    "pets-bf16": ("pets", None, False, {}, True, True),
    "pets-bf16-nocap": ("pets", None, False, {}, False, True),
    "pets-q4": ("pets", 4, False, {}, True, True),
    "people-q4-ckpt": ("people", 4, True, {}, True, True),
    "people-bf16": ("people", None, False, {}, True, False),
    "people-bf16-profiled": ("people", None, False, {}, False, True),
    "style-bf16": ("style", None, False, {}, True, False),
    "people-q4": ("people", 4, False, {}, True, False),
    "style-q4": ("style", 4, False, {}, True, False),
    "style-bf16-ckpt": ("style", None, True, {}, True, False),
    "style-q4-ckpt": ("style", 4, True, {}, True, False),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--switch", action="append", default=[],
                        help="NAME=VALUE of engine.flux.speed for every variant, e.g. GELU_SAVES_INPUT=0")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-host-ranges", action="store_true", help="profiles without the host's ranges (HOST_RANGES)")
    parser.add_argument("--matmuls", action="store_true", help="first, the fused-projection matmul probe")
    args = parser.parse_args()
    global HOST_RANGES
    HOST_RANGES = not args.no_host_ranges
    if args.matmuls:
        matmuls = [rope_probe()] + lora_kernel_probe() + dequantize_probe() + matmul_probe()
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "matmuls.json").write_text(json.dumps(matmuls, indent=1))
    extra = {}
    for item in args.switch:
        name, _, value = item.partition("=")
        extra[name] = bool(int(value))
    rows, transformers = [], {}
    for variant in args.variants:
        # "pets-bf16+GELU_SAVES_INPUT=0,...@8" adds switches and sets the memory limit (GiB, or "none")
        variant_name, _, cap_text = variant.partition("@")
        base, _, tail = variant_name.partition("+")
        template, quantize, checkpointing, switches, cap, profile = VARIANTS[base]
        if cap_text:
            cap = False if cap_text == "none" else float(cap_text)
        switches = dict(switches, **extra)
        for item in filter(None, tail.split(",")):
            name, _, value = item.partition("=")
            switches[name] = bool(int(value)) if isinstance(speed.DEFAULTS.get(name), bool) else int(value)
        if quantize not in transformers:
            transformers.clear()
            mx.clear_cache()
            transformers[quantize] = build_transformer(quantize)
        transformer = transformers[quantize]
        apply_lora(transformer, clamp_targets(lora_targets(load_template(template))), key=mx.random.key(0))
        try:
            row = run_variant(transformer, template, quantize, checkpointing, switches, cap, args.steps,
                              profile and not args.no_profile and not SMALL)
        except Exception as error:  # keep measuring the others
            row = {"variant": variant, "error": repr(error)[:400]}
        row["variant"] = variant
        remove_lora(transformer)
        transformer.freeze()
        summary = {k: v for k, v in row.items() if k != "profile"}
        print(json.dumps(summary), flush=True)
        if "profile" in row:
            print(json.dumps(row["profile"], indent=1), flush=True)
        rows.append(row)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "profile.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
