"""GPU probe: where the training step's memory goes, full-size FLUX.1-dev, 512x512.

Variants of one template's step (forward only, eager or compiled, with and
without per-block checkpointing, bf16 or a 4-bit base), each printing the
peak above the resident weights and the median step time. Used to find and
check the memory fixes in bench/NOTES.md.

    python bench/probe_memory.py [--template pets]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402,F401
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402

from bench.bench_train import SMALL, build_transformer  # noqa: E402
from engine.config import load_template, lora_targets  # noqa: E402
from engine.flux.latents import latent_image_ids, text_ids  # noqa: E402
from engine.lora import apply_lora, remove_lora  # noqa: E402
from engine.training_step import make_train_step  # noqa: E402


def inputs(resolution=64 if SMALL else 512, text=8 if SMALL else 512):
    latent = resolution // 16
    keys = mx.random.split(mx.random.key(1), 4)
    arrays = (mx.random.normal((1, latent * latent, 64), key=keys[0]),
              mx.random.normal((1, latent * latent, 64), key=keys[1]),
              mx.random.normal((1, text, 4096), key=keys[2]).astype(mx.bfloat16),
              mx.random.normal((1, 768), key=keys[3]).astype(mx.bfloat16),
              mx.array([0.6]), mx.array([3.0]), latent_image_ids(latent * 2, latent * 2), text_ids(text))
    mx.eval(arrays)
    return arrays


def run_variant(transformer, name, mode, checkpointing, steps=4):
    transformer.gradient_checkpointing = checkpointing
    latents, noise, hidden, pooled, sigma, guidance, img_ids, txt_ids = inputs()
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(transformer.trainable_parameters())

    def loss_fn(latents, noise, hidden, pooled, sigma, guidance, img_ids, txt_ids):
        s = sigma[:, None, None]
        noisy = ((1 - s) * latents + s * noise).astype(mx.bfloat16)
        prediction = transformer(noisy, hidden, pooled, sigma.astype(mx.bfloat16), img_ids, txt_ids,
                                 guidance.astype(mx.bfloat16))
        return mx.mean(mx.square(prediction.astype(mx.float32) - (noise - latents)))

    if mode == "forward":
        def step(*arrays):
            loss = loss_fn(*arrays)
            mx.eval(loss)
            return loss
    elif mode == "eager":
        loss_and_grad = nn.value_and_grad(transformer, loss_fn)

        def step(*arrays):
            loss, grads = loss_and_grad(*arrays)
            optimizer.update(transformer, grads)
            mx.eval(loss, transformer.state, optimizer.state)
            return loss
    else:
        step = make_train_step(transformer, optimizer, mx.bfloat16, True)
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    times = []
    for index in range(steps):
        start = time.perf_counter()
        mx.eval(step(latents, noise, hidden, pooled, sigma, guidance, img_ids, txt_ids))  # the compiled step only queues
        times.append(time.perf_counter() - start)
    row = {"variant": name, "mode": mode, "checkpointing": checkpointing,
           "resident_gib": round(base / 2**30, 2), "extra_peak_gib": round((mx.get_peak_memory() - base) / 2**30, 2),
           "s_median": round(sorted(times[1:])[len(times[1:]) // 2], 4)}
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--template", default="pets")
    parser.add_argument("--quantize", nargs="+", default=["none", "4"])
    args = parser.parse_args()
    rows = []
    for quant in args.quantize:
        transformer = build_transformer(None if quant == "none" else int(quant))
        targets = lora_targets(load_template(args.template))
        if SMALL:
            targets = [t for t in targets if t[0].startswith("single_transformer_blocks.0.")]
        apply_lora(transformer, targets, key=mx.random.key(0))
        for mode, checkpointing in (("forward", False), ("eager", False), ("eager", True),
                                    ("compiled", False), ("compiled", True)):
            rows.append(run_variant(transformer, f"{args.template}-q{quant}", mode, checkpointing))
        remove_lora(transformer)
        del transformer
        mx.clear_cache()
    import os

    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"probe_{args.template}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
