"""GPU benchmark: DreamBooth LoRA training steps of full-size FLUX.1 through our
trainer's own step (engine/training_step.py), random weights, no download.

For each template (the guide's pets/people/style layouts, read from
templates/*.json), quantize none/8/4 and gradient checkpointing off/on:
median seconds per step after warm-up, peak memory (mx.get_peak_memory, the
frozen weights included) and the memory estimator's prediction.

Run from the repo root on the GPU machine:
    python bench/bench_train.py [--templates pets people style] [--quantize none 8 4] [--checkpointing off on]
Prints one JSON row per configuration; with $OUT set, writes $OUT/ours.json.
SMALL=1 runs a CPU smoke test (1 joint + 2 single blocks, 64x64).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402,F401  (preloads the BLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from engine.config import load_template, lora_targets  # noqa: E402
from engine.flux.latents import latent_image_ids, text_ids  # noqa: E402
from engine.flux.loading import quantize_module  # noqa: E402
from engine.flux.transformer import FluxTransformer  # noqa: E402
from engine.lora import apply_lora, remove_lora  # noqa: E402
from engine.training_step import make_train_step, make_uncompiled_step  # noqa: E402

SMALL = bool(os.environ.get("SMALL"))
DEFAULT_MEMORY_LIMIT = mx.set_memory_limit(0)  # MLX's default, read by setting and restoring it
mx.set_memory_limit(DEFAULT_MEMORY_LIMIT)
# FLUX.1-dev's published transformer/config.json (schnell: guidance_embeds false)
DEV_CONFIG = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
              "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
              "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
FULL_DEV_CONFIG = dict(DEV_CONFIG)  # the estimate is always of the full model
if SMALL:
    DEV_CONFIG.update(num_layers=1, num_single_layers=2)


def build_transformer(quantize: int | None, variant: str = "dev") -> FluxTransformer:
    config = dict(DEV_CONFIG, guidance_embeds=variant == "dev")
    mx.random.seed(0)
    transformer = FluxTransformer(config)
    dtype = mx.float32 if SMALL else mx.bfloat16
    transformer.set_dtype(dtype)
    mx.eval(transformer.parameters())
    if quantize:
        quantize_module(transformer, quantize, "transformer")
    transformer.freeze()
    return transformer


def clamp_targets(targets):
    """The template's LoRA layers on the SMALL smoke model: each block index folded into its few blocks
    (people's single blocks 10-38 onto 0-1), so every template keeps its layer types and ranks (dropping
    the out-of-range blocks left people with nothing to train)."""
    if not SMALL:
        return targets
    limits = {"transformer_blocks": DEV_CONFIG["num_layers"], "single_transformer_blocks": DEV_CONFIG["num_single_layers"]}
    folded: dict[str, int] = {}
    for path, rank in targets:
        kind, block, layer = path.split(".", 2)
        folded.setdefault(f"{kind}.{int(block) % limits[kind]}.{layer}", rank)
    return list(folded.items())


def estimate_gib(template_config, quantize, checkpointing, resolution):
    """The estimator's training-phase peak (GiB) and its parts, for the same config."""
    from engine.memory import estimate_memory, inputs_from_config
    from engine.memory_limit import graph_memory_limit

    cfg = template_config
    cfg.quantize, cfg.gradient_checkpointing, cfg.width, cfg.height = quantize, checkpointing, resolution, resolution
    cfg.training_loop.batch_size = 1
    backend = "cpu" if SMALL else "cuda"
    estimate = estimate_memory(inputs_from_config(cfg, FULL_DEV_CONFIG, backend=backend, dtype_bytes=4 if SMALL else 2))
    return (round(estimate.training_peak / 2**30, 2), {k: round(v / 2**30, 3) for k, v in estimate.parts.items()},
            graph_memory_limit(estimate))


def step_intervals(one_step, warmup: int, steps: int, losses: list | None = None) -> list[float]:
    """Seconds between successive steps' losses becoming ready, as the trainer runs them: step i+1
    is queued before step i's loss is read (engine/trainer.py). Warm-up steps (compilation) first.
    Every loss read is appended to `losses` when given."""
    losses = [] if losses is None else losses
    for index in range(warmup):
        losses.append(float(one_step(index)))
    pending, ready, times = None, None, []
    for index in range(warmup, warmup + steps + 1):
        queued = one_step(index)
        if pending is not None:
            losses.append(float(pending))
            now = time.perf_counter()
            if ready is not None:
                times.append(now - ready)
            ready = now
        pending = queued
    losses.append(float(pending))
    times.append(time.perf_counter() - ready)
    return times


def steady_intervals(intervals: list[float]) -> list[float]:
    """The intervals without the last, which is short (0.02 s against 0.12 s on an H100, run 12): its
    step had mostly run by the time the next-to-last loss was read. The mean over all of them is
    the run's true rate; the median without it is robust to a step held back by the memory cap."""
    return intervals[:-1] if len(intervals) > 2 else intervals


def measure(transformer, template: str, checkpointing: bool, resolution: int, steps: int, warmup: int = 3,
            memory_limit: int | None = None, switches: dict | None = None, phase_peaks: bool = False,
            uncompiled: bool = False) -> dict:
    from engine.flux import speed

    dtype = mx.float32 if SMALL else mx.bfloat16
    # the trainer's choice of routes for this run (engine/flux/speed.py), then any set by --switch
    switched_off = speed.configure_for_training()
    speed.__dict__.update(switches or {})
    mx.set_memory_limit(memory_limit or DEFAULT_MEMORY_LIMIT)
    transformer.gradient_checkpointing = checkpointing
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(transformer.trainable_parameters())
    make = make_uncompiled_step if uncompiled else make_train_step
    step = make(transformer, optimizer, dtype, has_guidance=transformer.guidance_embeds)
    latent = resolution // 16
    tokens, text = latent * latent, (8 if SMALL else 512)
    key = mx.random.key(1)
    k = mx.random.split(key, 5)
    latents = mx.random.normal((1, tokens, 64), key=k[0])
    hidden = mx.random.normal((1, text, 4096), key=k[1]).astype(dtype)
    pooled = mx.random.normal((1, 768), key=k[2]).astype(dtype)
    img_ids, txt_ids = latent_image_ids(latent * 2, latent * 2), text_ids(text)
    guidance = mx.array([3.0])
    mx.eval(latents, hidden, pooled, img_ids, txt_ids)

    def one_step(index):
        noise = mx.random.normal(latents.shape, key=mx.random.key(100 + index))
        sigma = mx.array([0.1 + 0.8 * ((index * 0.37) % 1.0)])
        return step(latents, noise, hidden, pooled, sigma, guidance, img_ids, txt_ids)

    mx.clear_cache()
    active_before = mx.get_active_memory()
    mx.reset_peak_memory()
    losses = []
    from engine import blockwise_step

    blockwise_step.PHASE_PEAKS = [] if phase_peaks else None  # makes each step wait for its end
    intervals = step_intervals(one_step, warmup, steps, losses)
    peaks_by_phase = blockwise_step.PHASE_PEAKS
    blockwise_step.PHASE_PEAKS = None
    steady = steady_intervals(intervals)
    n_lora = sum(v.size for _, v in tree_flatten(transformer.trainable_parameters()))
    return {"s_per_step_median": round(statistics.median(steady), 4), "s_per_step_min": round(min(steady), 4),
            "s_per_step_mean": round(sum(intervals) / len(intervals), 4),
            # in order: a step held back by the memory cap shows here, not in the median
            "s_per_step_each": [round(t, 4) for t in intervals],
            "peak_gib": round(mx.get_peak_memory() / 2**30, 2), "active_before_gib": round(active_before / 2**30, 2),
            "lora_params": int(n_lora), "switched_off": switched_off,
            "phase_peaks_gib": {phase: round(max(b for p, b in peaks_by_phase if p == phase) / 2**30, 2)
                                for phase in ("forward", "backward")} if peaks_by_phase else None, "losses": [round(v, 4) for v in losses],
            "losses_finite": all(math.isfinite(v) for v in losses)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--templates", nargs="+", default=["pets", "people", "style"])
    parser.add_argument("--quantize", nargs="+", default=["none", "8", "4"])
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"])
    parser.add_argument("--resolution", type=int, default=64 if SMALL else 512)
    parser.add_argument("--steps", type=int, default=2 if SMALL else 10)
    parser.add_argument("--memory-limit", choices=["trainer", "estimate", "default"], default="trainer",
                        help="trainer: as the trainer does (the estimate, for checkpointed or joint-block runs; "
                             "engine/memory_limit.py: limits_graph_memory); estimate: always; default: MLX's own")
    parser.add_argument("--memory-limit-gib", type=float, help="set MLX's memory limit to this instead")
    parser.add_argument("--phase-peaks", action="store_true",
                        help="the block-by-block step's forward and backward peaks (each step then waits for its end)")
    parser.add_argument("--depths", type=int, nargs="+",
                        help="checkpointed rows: one row per block-by-block depth (BLOCKWISE_DEPTH), in one process; "
                             "-1 never waits between stages, leaving MLX's own limit of in-flight CUDA graphs")
    parser.add_argument("--uncompiled", action="store_true",
                        help="every step with MLX's compile off, as the trainer runs the steps it queues while the "
                             "kernel warm-up compiles (engine/training_step.py: make_uncompiled_step)")
    parser.add_argument("--switch", action="append", default=[], metavar="NAME=0|1",
                        help="set a switch of engine/flux/speed.py after the trainer's own choice (repeatable; "
                             "a number for the integer ones: BLOCKWISE_DEPTH=3)")
    args = parser.parse_args()
    from engine.flux import speed

    switches = {}
    for text in args.switch:
        name, _, value = text.partition("=")
        default = 1 if name == "BLOCKWISE_DEPTH" else speed.DEFAULTS.get(name)  # an int; None: the backend's
        if not isinstance(default, (bool, int)) or not value.lstrip("-").isdigit() or (isinstance(default, bool) and value not in "01"):
            parser.error(f"--switch {text}: expected NAME=0 or NAME=1 (a number for an integer one) with NAME one of "
                         f"{', '.join(k for k, v in speed.DEFAULTS.items() if isinstance(v, (bool, int)) or k == 'BLOCKWISE_DEPTH')}")
        switches[name] = value == "1" if isinstance(default, bool) else int(value)
    # MLX's CUDA-graph settings as the trainer chooses them, before the first kernel (read once a
    # process): small graphs where the checkpointed step runs one stage at a time
    depths = args.depths or [switches.get("BLOCKWISE_DEPTH", speed.blockwise_depth())]
    one_stage = set(depths) == {0} and args.checkpointing == ["on"]
    graph_settings = speed.configure_cuda_graphs(one_stage_at_a_time=one_stage,
                                                 unbounded=set(depths) == {-1} and args.checkpointing == ["on"])
    rows = []
    device = str(mx.default_device())
    for quant_text in args.quantize:
        quantize = None if quant_text == "none" else int(quant_text)
        start = time.perf_counter()
        transformer = build_transformer(quantize)
        build_s = time.perf_counter() - start
        weights_gib = mx.get_active_memory() / 2**30
        for template in args.templates:
            config = load_template(template)
            targets = clamp_targets(lora_targets(config))
            apply_lora(transformer, targets, key=mx.random.key(0))
            runs = [(c == "on", None) for c in args.checkpointing if c != "on" or not args.depths]
            runs += [(True, depth) for depth in (args.depths or []) if "on" in args.checkpointing]
            for checkpointing, depth in runs:
                row_switches = dict(switches, **({} if depth is None else {"BLOCKWISE_DEPTH": depth}))
                row = {"template": template, "quantize": quantize, "checkpointing": checkpointing,
                       "resolution": args.resolution, "device": device, "mlx": mx.__version__,
                       "weights_gib": round(weights_gib, 2), "build_s": round(build_s, 1), "switches_set": row_switches,
                       "mlx_env": {k: v for k, v in os.environ.items() if k.startswith("MLX_")},
                       "graph_settings_set": graph_settings, "uncompiled": args.uncompiled}
                try:
                    # the estimate at this row's settings (the previous row's --depths must not leak in)
                    speed.configure_for_training()
                    speed.__dict__.update(row_switches)
                    estimate, parts, limit = estimate_gib(load_template(template), quantize, checkpointing,
                                                          args.resolution)
                    from engine.memory_limit import limits_graph_memory

                    run_config = load_template(template)
                    run_config.gradient_checkpointing = checkpointing
                    capped = {"estimate": True, "default": False,
                              "trainer": limits_graph_memory(run_config, FULL_DEV_CONFIG, "cuda")}[args.memory_limit]
                    limit = limit if capped else None
                    if args.memory_limit_gib:
                        limit = int(args.memory_limit_gib * 2**30)
                    row["memory_limit_gib"] = round(limit / 2**30, 2) if limit else None
                    row.update(measure(transformer, template, checkpointing, args.resolution, args.steps,
                                       memory_limit=limit, switches=row_switches, phase_peaks=args.phase_peaks,
                                       uncompiled=args.uncompiled))
                    row["estimate_gib"], row["estimate_parts_gib"] = estimate, parts
                except Exception as error:  # keep measuring the others
                    row["error"] = repr(error)[:300]
                print(json.dumps(row), flush=True)
                rows.append(row)
                if os.environ.get("OUT"):  # after every row: a timeout keeps what was measured
                    Path(os.environ["OUT"], "ours.json").write_text(json.dumps(rows, indent=1))
            remove_lora(transformer)
            transformer.freeze()
        del transformer
        mx.clear_cache()


if __name__ == "__main__":
    main()
