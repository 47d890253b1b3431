"""GPU probe: which route makes checkpointed joint-block training crash on CUDA.

Run 9 (bench/NOTES.md, item 12): the style template with gradient checkpointing
hit "illegal memory access" on an H200; pets and people (single blocks only)
did not. This builds FLUX.1-dev's widths with a few blocks laid out like style
(an untrained joint block, a trained one, an untrained one the backward passes
through; an untrained single block, a trained one), trains three steps with
checkpointing through our real compiled step, and does it once per variant, each
in its own process (an illegal memory access kills the process that hits it).

    python bench/bisect_joint_ckpt.py [--variants all -ROPE_KERNEL ...] [--timeout 120]
A variant is "all" (every speed switch on), "none" (every one off), "-NAME" (one
off) or "+NAME" (only that one on); a suffix ":nockpt" runs it without
checkpointing, ":full" on the full-size model with the style template's layers.
With $OUT set, writes $OUT/bisect.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_VARIANTS = ["all", "none", "-ROPE_KERNEL", "-GELU_SAVES_INPUT", "-LORA_KERNELS", "-LORA_ADDMM",
                    "all:nockpt"]
SMALL_TARGETS = [("transformer_blocks.1.attn.to_q", 16), ("transformer_blocks.1.attn.to_k", 16),
                 ("transformer_blocks.1.attn.to_v", 16), ("single_transformer_blocks.1.proj_out", 8)]


def run_one(variant: str) -> dict:
    """In this process: the variant's three checkpointed steps; returns the losses."""
    import engine  # noqa: F401  (BLAS preload)
    import mlx.core as mx
    import mlx.optimizers as optim

    from bench import bench_train
    from engine.config import load_template, lora_targets
    from engine.flux import speed
    from engine.lora import apply_lora

    name, _, mode = variant.partition(":")
    if mode != "full":
        bench_train.DEV_CONFIG.update(num_layers=3, num_single_layers=2)
    switches = dict(speed.DEFAULTS)
    if name == "none":
        switches = dict.fromkeys(switches, False)
    elif name.startswith("+"):
        switches = dict.fromkeys(switches, False) | {name[1:]: True}
    elif name.startswith("-"):
        switches[name[1:]] = False
    transformer = bench_train.build_transformer(None)
    targets = lora_targets(load_template("style")) if mode == "full" else SMALL_TARGETS
    apply_lora(transformer, targets, key=mx.random.key(0))
    # B starts at zero; make it non-zero so every LoRA product has a real gradient path
    for path, rank in targets:
        layer = transformer
        for part in path.split("."):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        layer.lora_B = 0.01 * mx.random.normal(layer.lora_B.shape)
    speed.__dict__.update(switches)  # after anything that may have configured them
    transformer.gradient_checkpointing = mode != "nockpt"
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(transformer.trainable_parameters())
    from engine.training_step import make_train_step

    step = make_train_step(transformer, optimizer, mx.bfloat16, has_guidance=True)
    batch, pooled_key = mx.random.split(mx.random.key(1))
    latents = mx.random.normal((1, 1024, 64))
    hidden = mx.random.normal((1, 512, 4096)).astype(mx.bfloat16)
    pooled = mx.random.normal((1, 768)).astype(mx.bfloat16)
    from engine.flux.latents import latent_image_ids, text_ids

    losses = []
    for index in range(3):
        noise = mx.random.normal(latents.shape, key=mx.random.key(100 + index))
        loss = step(latents, noise, hidden, pooled, mx.array([0.5]), mx.array([3.0]),
                    latent_image_ids(64, 64), text_ids(512))
        mx.synchronize()
        losses.append(float(loss))
    return {"switches": {k: v for k, v in switches.items()}, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child)), flush=True)
        return
    rows = []
    for variant in args.variants:
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, __file__, "--child", variant], capture_output=True, text=True,
                                  timeout=args.timeout)
            result = next((json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")),
                          None)
            row = {"variant": variant, "rc": done.returncode, "ok": result is not None, **(result or {}),
                   "stderr_tail": done.stderr[-600:] if result is None else ""}
        except subprocess.TimeoutExpired:
            row = {"variant": variant, "rc": None, "ok": False, "stderr_tail": f"timed out after {args.timeout} s"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "bisect.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
