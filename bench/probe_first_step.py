"""GPU probe: where a first training step's time goes (kernel compiles, cuDNN plans, tracing).

Builds FLUX.1-dev's widths with a few blocks (2 joint + 4 single, people-like LoRA on the single
blocks), then times the first and second calls of the trainer's compiled step (trace + queue,
then run), once per variant, each in its own process so nothing is cached in memory between them.

    python bench/probe_first_step.py [--variants all ~FAST_SDPA ...] [--checkpointing]
A variant is "all" (every speed switch on) or "~NAME" (that one off). With $OUT set, writes
$OUT/first_step.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.own_process import run_variants  # noqa: E402


def run_one(variant: str, checkpointing: bool) -> dict:
    import engine  # noqa: F401
    import mlx.core as mx
    import mlx.optimizers as optim

    from bench import bench_train
    from engine.flux import speed
    from engine.flux.latents import latent_image_ids, text_ids
    from engine.lora import apply_lora
    from engine.training_step import make_train_step

    bench_train.DEV_CONFIG.update(num_layers=2, num_single_layers=4)
    transformer = bench_train.build_transformer(None)
    if variant.startswith("~"):
        setattr(speed, variant[1:], False)
    targets = [(f"single_transformer_blocks.{b}.{n}", 8) for b in range(4)
               for n in ("proj_out", "proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v")]
    apply_lora(transformer, targets, key=mx.random.key(0))
    transformer.gradient_checkpointing = checkpointing
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(transformer.trainable_parameters())
    step = make_train_step(transformer, optimizer, mx.bfloat16, has_guidance=True)
    latents = mx.random.normal((1, 1024, 64))
    hidden = mx.random.normal((1, 512, 4096)).astype(mx.bfloat16)
    pooled = mx.random.normal((1, 768)).astype(mx.bfloat16)
    mx.eval(latents, hidden, pooled)
    row = {"variant": variant, "checkpointing": checkpointing}
    for index in range(2):
        noise = mx.random.normal(latents.shape)
        mx.eval(noise)
        start = time.perf_counter()
        loss = step(latents, noise, hidden, pooled, mx.array([0.5]), mx.array([3.0]), latent_image_ids(64, 64),
                    text_ids(512))
        queued = time.perf_counter()
        float(loss)
        row[f"step{index + 1}_queue_s"] = round(queued - start, 3)
        row[f"step{index + 1}_run_s"] = round(time.perf_counter() - queued, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=["all", "~FAST_SDPA"])
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--timeout", type=float, default=150)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args.checkpointing)), flush=True)
        return
    run_variants(__file__, args.variants, args.timeout, "first_step.json",
                 ["--checkpointing"] if args.checkpointing else [])


if __name__ == "__main__":
    main()
