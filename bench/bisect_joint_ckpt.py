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
off) or "+NAME" (only that one on); flags after it: ":nockpt" runs it without
checkpointing, ":full" on the full-size model with the style template's layers,
":randomB" starts LoRA's B random instead of zero, ":rank8" caps ranks at 8,
":jointonly" drops the single-block targets, ":pets" trains single blocks only (pets'
layer types, rank 4), ":f32" trains in float32, ":contig" gives joint blocks the fused
attention on contiguous arrays (speed.CONTIGUOUS_JOINT_ATTENTION), ":rawfused" the fused
attention as MLX has it (on CUDA they otherwise recompute its backward). Each row
also has the first step's gradients taken eagerly (uncompiled) before any update. Each row also says which LoRA
weights first turned non-finite.
With $OUT set, writes $OUT/bisect.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.own_process import run_variants  # noqa: E402

DEFAULT_VARIANTS = ["all:nockpt", "none:nockpt", "all:nockpt:randomB", "none:nockpt:randomB",
                    "-LORA_KERNELS:nockpt:randomB", "-ROPE_KERNEL:nockpt:randomB", "-GELU_SAVES_INPUT:nockpt:randomB",
                    "all", "none"]
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

    name, *flags = variant.split(":")
    mode = "full" if "full" in flags else ""
    if mode != "full":
        bench_train.DEV_CONFIG.update(num_layers=3, num_single_layers=2)
    switches = dict(speed.DEFAULTS)
    if name == "none":
        switches = dict.fromkeys(switches, False)
    elif name.startswith("+"):
        switches = dict.fromkeys(switches, False) | {name[1:]: True}
    elif name.startswith(("-", "~")):  # "~NAME": the same, where a leading "-" would read as an option
        switches[name[1:]] = False
    transformer = bench_train.build_transformer(None)
    dtype = mx.float32 if "f32" in flags else mx.bfloat16
    transformer.set_dtype(dtype)
    targets = lora_targets(load_template("style")) if mode == "full" else SMALL_TARGETS
    if "rank8" in flags:
        targets = [(path, min(rank, 8)) for path, rank in targets]
    if "pets" in flags:  # single blocks only, laid out like pets: every single-block layer type, rank 4
        targets = [(f"single_transformer_blocks.{block}.{name}", 4) for block in (0, 1)
                   for name in ("proj_out", "proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v")]
    if "jointonly" in flags:
        targets = [(path, rank) for path, rank in targets if path.startswith("transformer_blocks")]
    apply_lora(transformer, targets, key=mx.random.key(0))
    # B starts at zero as in training; "randomB" makes it non-zero so every LoRA product has a gradient path
    for path, rank in targets if "randomB" in flags else []:
        layer = transformer
        for part in path.split("."):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        layer.lora_B = 0.01 * mx.random.normal(layer.lora_B.shape)
    speed.__dict__.update(switches)  # after anything that may have configured them
    if "contig" in flags:
        speed.CONTIGUOUS_JOINT_ATTENTION = True
    if "rawfused" in flags:  # the fused backward as MLX has it, in joint blocks too (NaN on CUDA, run 10)
        from engine.flux import layers

        layers._joint_backward = lambda: "fused"
    transformer.gradient_checkpointing = "nockpt" not in flags
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(transformer.trainable_parameters())
    from engine.training_step import make_train_step

    step = make_train_step(transformer, optimizer, dtype, has_guidance=True)
    batch, pooled_key = mx.random.split(mx.random.key(1))
    latents = mx.random.normal((1, 1024, 64))
    hidden = mx.random.normal((1, 512, 4096)).astype(mx.bfloat16)
    pooled = mx.random.normal((1, 768)).astype(mx.bfloat16)
    from engine.flux.latents import latent_image_ids, text_ids

    from mlx.utils import tree_flatten

    losses, nonfinite = [], []
    # the first step's gradients, eagerly, before any update: are they finite?
    import mlx.nn as nn

    def loss_fn(noise):
        prediction = transformer((0.5 * latents + 0.5 * noise).astype(dtype), hidden.astype(dtype),
                                 pooled.astype(dtype), mx.array([0.5], dtype=dtype), latent_image_ids(64, 64),
                                 text_ids(512), mx.array([3.0], dtype=dtype))
        return mx.mean(mx.square(prediction.astype(mx.float32) - (noise - latents)))

    first_loss, grads = nn.value_and_grad(transformer, loss_fn)(mx.random.normal(latents.shape, key=mx.random.key(100)))
    bad_grads = [path for path, value in tree_flatten(grads) if not mx.isfinite(value).all().item()]
    eager = {"eager_first_loss": float(first_loss), "eager_nonfinite_grads": bad_grads[:6],
             "eager_grad_max": max(float(mx.abs(value).max()) for _, value in tree_flatten(grads)),
             # a fingerprint to compare two variants' gradients (same seed, same inputs)
             "eager_grad_norms": {path: float(mx.linalg.norm(value.astype(mx.float32)))
                                  for path, value in tree_flatten(grads)}}
    del grads
    for index in range(3):
        noise = mx.random.normal(latents.shape, key=mx.random.key(100 + index))
        loss = step(latents, noise, hidden, pooled, mx.array([0.5]), mx.array([3.0]),
                    latent_image_ids(64, 64), text_ids(512))
        mx.synchronize()
        losses.append(float(loss))
        if not nonfinite:  # the first step whose update left a non-finite LoRA weight: which ones
            nonfinite = [path for path, value in tree_flatten(transformer.trainable_parameters())
                         if not mx.isfinite(value).all().item()]
            nonfinite = [f"after step {index + 1}: {len(nonfinite)}", *nonfinite[:6]] if nonfinite else []
    return {"switches": switches, "losses": losses, "nonfinite": nonfinite, **eager}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child)), flush=True)
        return
    run_variants(__file__, args.variants, args.timeout, "bisect.json")


if __name__ == "__main__":
    main()
