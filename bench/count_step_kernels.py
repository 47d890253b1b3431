"""How many primitives (on CUDA, roughly kernels) one training step queues: full FLUX.1 depth (19 + 38
blocks) at a small width, on any machine (nothing is evaluated). For the host-bound steps of bench/NOTES.md
(item 42): the counts, not the arithmetic, set a checkpointed 4-bit step's time on CUDA.

    python bench/count_step_kernels.py --template people --quantize 4 --checkpointing on
    python bench/count_step_kernels.py --switch LORA_COMPUTE_COPIES=0 ...

Counted as no kernel: views and bookkeeping (reshape, transpose, broadcast, slice, split, depends, custom
function wrappers). Left out: dequantizes (on CPU MLX's expands into many ops; on CUDA each is one kernel of
ours, one per quantized layer a forward runs). CPU-only routes count more than CUDA runs: RMSNorm and
LayerNorm (one fused kernel each on CUDA), attention (cuDNN). So compare counts with each other, not
with a CUDA profile."""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402,F401  (preloads the BLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from engine import blockwise_step  # noqa: E402
from engine.config import load_template, lora_targets  # noqa: E402
from engine.flux import speed  # noqa: E402
from engine.flux.latents import latent_image_ids, text_ids  # noqa: E402
from engine.flux.loading import quantize_module  # noqa: E402
from engine.flux.transformer import FluxTransformer  # noqa: E402
from engine.lora import apply_lora  # noqa: E402
from engine.training_step import make_train_step  # noqa: E402

NO_KERNEL = {"Broadcast", "Reshape", "Slice", "Transpose", "ExpandDims", "Squeeze", "AsStrided", "StopGradient",
             "Depends", "Split", "Unflatten", "Flatten", "CustomTransforms", "View complex64", "View float32",
             "View bfloat16"}
# MLX's CPU dequantize, expanded (our CUDA kernel is one launch, counted through "Dequantize" below)
CPU_DEQUANTIZE = re.compile(r"LeftShift|RightShift|^Concatenate$|^CompiledAsTypeBroadcastMultiplyBroadcastAdd$")


def count(outputs) -> Counter:
    buffer = io.StringIO()
    mx.export_to_dot(buffer, *outputs)
    return Counter(re.findall(r'label ="([^"]+)", shape=rectangle', buffer.getvalue()))


def full_depth_model(template: str, quantize: int | None, width: int, checkpointing: bool, switches=()):
    """FLUX.1's 19 + 38 blocks at a small width (bf16, random), quantized and with the template's LoRA
    layers as the trainer makes them, and an AdamW for it: (transformer, optimizer). `switches`: "NAME=0|1"
    texts for engine/flux/speed.py, set first."""
    for text in switches:
        name, _, value = text.partition("=")
        setattr(speed, name, value == "1")
    config = {"num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
              "num_attention_heads": width // 128, "joint_attention_dim": 64, "pooled_projection_dim": 32,
              "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
    transformer = FluxTransformer(config)
    transformer.update(tree_map(lambda a: a.astype(mx.bfloat16), transformer.parameters()))
    if quantize:
        quantize_module(transformer, quantize)
    apply_lora(transformer, lora_targets(load_template(template), 19, 38), key=mx.random.key(0))
    transformer.gradient_checkpointing = checkpointing
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(transformer.trainable_parameters())
    mx.eval(transformer.parameters(), optimizer.state)
    return transformer, optimizer


def step_arrays() -> tuple:
    """One step's inputs for `full_depth_model`'s transformer: 64 image tokens, 32 text tokens."""
    arrays = (mx.random.normal((1, 16, 64)), mx.random.normal((1, 16, 64)), mx.random.normal((1, 32, 64)),
              mx.random.normal((1, 32)), mx.array([0.5]), mx.array([3.0]), latent_image_ids(8, 8), text_ids(32))
    mx.eval(arrays)
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", default="people")
    parser.add_argument("--quantize", type=int, choices=[4, 8])
    parser.add_argument("--checkpointing", choices=["on", "off"], default="on")
    parser.add_argument("--width", type=int, default=256, help="heads x 128 (FLUX.1: 3072); counts do not depend on it")
    parser.add_argument("--switch", action="append", default=[], metavar="NAME=0|1")
    args = parser.parse_args()
    transformer, optimizer = full_depth_model(args.template, args.quantize, args.width, args.checkpointing == "on",
                                              args.switch)

    queued = []
    # nothing is evaluated: every queued array keeps its graph for the count
    blockwise_step.BoundedQueue.push = lambda self, arrays: queued.append(arrays)
    blockwise_step.BoundedQueue.drain = lambda self: None
    mx.async_eval = lambda *arrays: queued.append(arrays)
    step = make_train_step(transformer, optimizer, mx.bfloat16, has_guidance=True, blockwise_depth=1)
    arrays = step_arrays()
    queued.append([step(*arrays)])
    leaves = [leaf for _, leaf in tree_flatten(queued) if isinstance(leaf, mx.array)]
    primitives = count(leaves)
    dequantizes = sum(1 for _, layer in transformer.named_modules() if type(layer).__name__ == "DequantizingLinear")
    kernels = {name: n for name, n in primitives.items() if name not in NO_KERNEL and not CPU_DEQUANTIZE.search(name)}
    row = {"template": args.template, "quantize": args.quantize, "checkpointing": args.checkpointing == "on",
           "switches": args.switch, "kernels": sum(kernels.values()), "dequantizing_layers": dequantizes,
           "by_primitive": dict(Counter(kernels).most_common(12))}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
