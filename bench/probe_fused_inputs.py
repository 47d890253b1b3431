"""GPU probe for bench/NOTES.md item 55's lead: a single block's q, k, v and MLP input as one quantized
product instead of four, each with its layer's LoRA, forward and backward, as a checkpointed step's
backward stage runs them (the forward recomputed with the dense weights kept, then the gradients of the
adapters and of the input).

Variants, at people's single-block shapes by default (1536 tokens, width 3072, MLP 12288, rank 8, 4-bit,
group 64, bf16 activations, MLX's routes as a 750-step run takes them):
  separate   four LoRA layers over dequantizing linears, as the step runs them now (engine/lora.py)
  fused      one dequantizing linear over the four packed weights concatenated along the output axis,
             each layer's LoRA added into its column slice of the product, the adapters' first products
             (x @ A.T) one product too, as engine/flux/fused_inputs.py runs it (add_adapters)
  fused_own_a  the same with each adapter's first product its own
  fused_sum  the same, the four LoRA products concatenated and added to the whole product at once
Each is one compiled function (the outputs, then the vjp for the adapters and the input), called
`--iterations` times, each call queued as the trainer queues a stage (async_eval, a sync every `--sync`),
so the host's share shows in the seconds a call. Prints one JSON row a variant (seconds a call, the
largest difference of its outputs and gradients from `separate`'s relative to their largest value) and
writes them to $OUT/fused_inputs.json where OUT is set.

    python bench/probe_fused_inputs.py                         # on a GPU
    python bench/probe_fused_inputs.py --tokens 64 --width 256 --mlp 1024 --iterations 3 --dtype float32  # CPU
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
import mlx.nn as nn  # noqa: E402

from engine.flux import speed  # noqa: E402
from engine.flux.fused_inputs import add_adapters  # noqa: E402
from engine.flux.loading import quantize_module  # noqa: E402
from engine.flux.quantized import keeping_dense_weights  # noqa: E402
from engine.lora import apply_lora  # noqa: E402
from engine.lora_kernels import add_low_rank, skinny_matmul  # noqa: E402

NAMES = ("q", "k", "v", "mlp")


def build(width: int, mlp: int, rank: int, bits: int, group: int, dtype: mx.Dtype):
    """(the four LoRA layers, one dequantizing linear over their packed weights concatenated)."""
    holder = nn.Module()
    for name in NAMES:
        setattr(holder, name, nn.Linear(width, mlp if name == "mlp" else width))
    holder.fused = nn.Linear(width, 3 * width + mlp)
    holder.set_dtype(dtype)
    quantize_module(holder, bits, "probe", group_size=group)
    apply_lora(holder, [(name, rank) for name in NAMES], key=mx.random.key(0))
    layers = [getattr(holder, name) for name in NAMES]
    for layer in layers:  # a trained adapter, not the zero B it starts from
        layer.lora_B = mx.random.normal(layer.lora_B.shape) * 0.02
    fused = holder.fused
    for key in ("weight", "scales", "biases", "bias"):
        fused[key] = mx.concatenate([layer.base[key] for layer in layers], axis=0)
    mx.eval(holder.parameters())
    return layers, fused


def variants(layers, fused):
    widths = [layer.base["bias"].shape[0] for layer in layers]
    splits = [sum(widths[:i + 1]) for i in range(len(widths) - 1)]

    def with_adapters(adapters, compute):
        saved = [(layer.lora_A, layer.lora_B) for layer in layers]
        for layer, (a, b) in zip(layers, adapters):
            layer.lora_A, layer.lora_B = a, b
        try:
            return compute()
        finally:
            for layer, (a, b) in zip(layers, saved):
                layer.lora_A, layer.lora_B = a, b

    def separate(x, adapters):
        return with_adapters(adapters, lambda: [layer(x) for layer in layers])

    def fused_slices(x, adapters):  # as engine/flux/fused_inputs.py: project runs it
        parts = mx.split(fused(x), splits, axis=-1)
        return with_adapters(adapters, lambda: add_adapters(layers, parts, x))

    def fused_own_a(x, adapters):  # each adapter's first product its own
        parts = mx.split(fused(x), splits, axis=-1)
        return with_adapters(adapters, lambda: [layer.add_to(part, x) for part, layer in zip(parts, layers)])

    def fused_sum(x, adapters):
        deltas = [add_low_rank(None, skinny_matmul(x, a), b * layer.scale) for layer, (a, b) in zip(layers, adapters)]
        return mx.split(fused(x) + mx.concatenate(deltas, axis=-1), splits, axis=-1)

    return {"separate": separate, "fused": fused_slices, "fused_own_a": fused_own_a, "fused_sum": fused_sum}


def stage(function):
    """The backward stage's work: outputs and the vjp for the input and the adapters, dense weights kept."""

    def run(x, flat, cotangents):
        def outputs(x, *flat):
            return function(x, list(zip(flat[0::2], flat[1::2])))

        with keeping_dense_weights():
            outs, grads = mx.vjp(outputs, [x, *flat], cotangents)
        return outs + grads

    return mx.compile(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1536)
    parser.add_argument("--width", type=int, default=3072)
    parser.add_argument("--mlp", type=int, default=12288)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--sync", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="each variant timed this many times, interleaved")
    parser.add_argument("--dtype", default="bfloat16", help="float32 checks the variants agree to rounding")
    args = parser.parse_args()
    speed.configure_for_training(steps=750)  # the routes a 750-step run takes (speed.kernels_not_worth_compiling)
    mx.random.seed(0)
    dtype = getattr(mx, args.dtype)
    layers, fused = build(args.width, args.mlp, args.rank, args.bits, args.group, dtype)
    x = mx.random.normal((1, args.tokens, args.width)).astype(dtype)
    flat = [array for layer in layers for array in (layer.lora_A, layer.lora_B)]
    cotangents = [mx.random.normal((1, args.tokens, layer.base["bias"].shape[0])).astype(dtype)
                  for layer in layers]
    mx.eval(x, flat, cotangents)
    functions = {name: stage(function) for name, function in variants(layers, fused).items()}
    results = {name: function(x, flat, cotangents) for name, function in functions.items()}
    mx.eval(results)
    reference = results["separate"]
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(args.rounds):
        for name, function in functions.items():
            started = time.perf_counter()
            for i in range(args.iterations):
                out = function(x, flat, cotangents)
                mx.async_eval(out)
                if (i + 1) % args.sync == 0:
                    mx.eval(out)
            mx.eval(out)
            times[name].append((time.perf_counter() - started) / args.iterations)
    rows = []
    for name, got in results.items():
        differences = [float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max()
                             / (mx.abs(b.astype(mx.float32)).max() + 1e-12)) for a, b in zip(got, reference)]
        row = {"variant": name, "s_per_call": [round(t, 6) for t in times[name]], "best_s": round(min(times[name]), 6),
               "max_rel_difference": round(max(differences), 5), "tokens": args.tokens, "width": args.width,
               "mlp": args.mlp, "rank": args.rank, "bits": args.bits, "dtype": args.dtype,
               "device": str(mx.default_device())}
        rows.append(row)
        print(json.dumps(row))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "fused_inputs.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
