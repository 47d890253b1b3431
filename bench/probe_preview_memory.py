"""GPU probe: what a preview's pieces hold, queued whole or piece by piece.

    python bench/probe_preview_memory.py [--resolution 512]

Full-size random FLUX.1-dev transformer over a 4-bit base (bench_train.build_transformer) and the
full-size VAE decoder: one denoising call (`transformer(...)` without and with `depth`) and one
decode (`vae.decode` without and with `depth`), each twice, alternating; for each, the peak above
what was allocated before it and its seconds (the first of each compiles kernels). Prints a JSON
row per call; with $OUT set, writes $OUT/preview_memory.json. Run 14 found a preview taking the
whole run's peak from 8.9 to 17.8 GiB (bench/NOTES.md item 30).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402,F401  (preloads the BLAS before mlx)
import mlx.core as mx  # noqa: E402

from bench.bench_train import SMALL, build_transformer  # noqa: E402
from bench.time_to_first_step import FULL_VAE_CHANGES  # noqa: E402
from engine.flux import speed  # noqa: E402
from engine.flux.latents import latent_image_ids, text_ids  # noqa: E402
from engine.flux.tiny import VAE_CONFIG  # noqa: E402
from engine.flux.vae import AutoencoderKL  # noqa: E402


def measure(name: str, compute) -> dict:
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    mx.eval(compute())
    seconds = time.perf_counter() - start
    row = {"call": name, "peak_above_gib": round((mx.get_peak_memory() - base) / 2**30, 3), "s": round(seconds, 3)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=64 if SMALL else 512)
    parser.add_argument("--quantize", type=int, default=4)
    args = parser.parse_args()
    dtype = mx.float32 if SMALL else mx.bfloat16
    transformer = build_transformer(args.quantize or None)
    vae = AutoencoderKL(VAE_CONFIG if SMALL else dict(VAE_CONFIG, **FULL_VAE_CHANGES))
    vae.set_dtype(dtype)
    mx.eval(vae.parameters())
    side = args.resolution // 8  # latent pixels; the transformer sees 2x2 patches
    keys = mx.random.split(mx.random.key(0), 4)
    call = (mx.random.normal((1, (side // 2) ** 2, 64), key=keys[0]).astype(dtype),
            mx.random.normal((1, 512, 4096), key=keys[1]).astype(dtype),
            mx.random.normal((1, 768), key=keys[2]).astype(dtype), mx.array([0.7], dtype=dtype),
            latent_image_ids(side, side), text_ids(512), mx.array([3.5], dtype=dtype))
    latents = mx.random.normal((1, side, side, vae.config.latent_channels), key=keys[3]).astype(dtype)
    mx.eval(call, latents)
    rows = []
    for _ in range(2):
        rows.append(measure("transformer, whole", lambda: transformer(*call)))
        rows.append(measure("transformer, block by block",
                            lambda: transformer(*call, depth=speed.INFERENCE_DEPTH)))
        rows.append(measure("VAE decode, whole", lambda: vae.decode(latents)))
        rows.append(measure("VAE decode, piece by piece", lambda: vae.decode(latents, depth=speed.INFERENCE_DEPTH)))
    result = {"resolution": args.resolution, "quantize": args.quantize, "device": str(mx.default_device()),
              "rows": rows}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "preview_memory.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
