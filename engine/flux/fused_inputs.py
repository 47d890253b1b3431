"""A single block's q, k, v and MLP input projections as one quantized product (speed.FUSED_SINGLE_INPUTS).

The four layers read the same normed input. On CUDA each is a dequantize and a cuBLAS call in the forward,
again in a checkpointed step's recompute, and a cuBLAS call for the input's gradient in the backward; the
4-bit step is bound by the host's cost per kernel and per cuBLAS call (bench/NOTES.md items 54-55). Here a
block's four packed weights, with their scales, quantization biases and layer biases, are concatenated along
the output axis into one frozen layer, `fused_inputs`, and the four layers' own arrays become slices of it (views:
no second copy), so every other route (and every name, file and LoRA) stays as it was. The block's call
runs that one layer, splits its output into the four, and adds each layer's LoRA to its part, the
adapters' first products (x @ A.T) also made as one (`add_adapters`); autodiff then takes the input's
gradient as one product of the four cotangents joined, and one more through the joined A's.

Off until measured on a GPU (bench/probe_fused_inputs.py, gpu_session.sh s28). The fusion is made where a
training step is built (engine/training_step.py), from the layers' arrays as they are then."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from engine.flux.quantized import DequantizingLinear
from engine.lora import LoRALinear

PACKED = ("weight", "scales", "biases", "bias")  # a dequantizing linear's arrays, joined along the output axis


def _layers(block: nn.Module) -> list[nn.Module]:
    """The block's layers that read the normed input, in the order their outputs are joined."""
    return [block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp]


def _base(layer: nn.Module) -> nn.Module:
    """The frozen linear under at most one LoRA wrapper (engine/lora.py: LoRALinear), else the layer."""
    return layer.base if isinstance(layer, LoRALinear) else layer


def fusable(block: nn.Module) -> bool:
    """Whether the four layers are dequantizing linears (each under at most one LoRA) of one quantization,
    with their biases, in one dtype."""
    layers = _layers(block)
    if any(isinstance(layer, LoRALinear) and isinstance(layer.base, LoRALinear) for layer in layers):
        return False
    bases = [_base(layer) for layer in layers]
    if not all(type(base) is DequantizingLinear and all(key in base for key in PACKED) for base in bases):
        return False
    first = bases[0]
    return all((base.group_size, base.bits, base.mode, base["scales"].dtype, base["weight"].shape[1])
               == (first.group_size, first.bits, first.mode, first["scales"].dtype, first["weight"].shape[1])
               for base in bases)


def fuse_single_block_inputs(transformer: nn.Module) -> int:
    """Give each fusable single block its `fused_inputs` layer, the four layers' arrays becoming slices
    of its arrays; blocks that have one keep it. Returns how many blocks were fused."""
    count = 0
    for block in getattr(transformer, "single_transformer_blocks", []):
        if "fused_inputs" in block or not fusable(block):
            continue
        bases = [_base(layer) for layer in _layers(block)]
        fused = DequantizingLinear.from_quantized(bases[0])  # its group size, bits and mode
        for key in PACKED:
            fused[key] = mx.concatenate([base[key] for base in bases], axis=0)
        mx.eval(fused.parameters())
        start = 0
        for base in bases:
            rows = base["weight"].shape[0]
            for key in PACKED:
                base[key] = fused[key][start:start + rows]
            start += rows
        mx.eval([base.parameters() for base in bases])
        fused.freeze()
        block.fused_inputs = fused
        count += 1
    return count


def project(block: nn.Module, x: mx.array) -> list[mx.array]:
    """The four layers' outputs on `x` (q, k, v, the MLP's input) through the block's `fused_inputs`."""
    layers = _layers(block)
    widths = [_base(layer)["bias"].shape[0] for layer in layers]
    return add_adapters(layers, mx.split(block.fused_inputs(x), _bounds(widths), axis=-1), x)


def add_adapters(layers: list[nn.Module], parts: list[mx.array], x: mx.array) -> list[mx.array]:
    """Each part (a layer's base output on `x`) plus the layer's LoRA product where it has one. The adapters'
    first products are one too, x @ [A_1; A_2; ...].T, split by rank: so a trained block's four adapters
    take one product where they took four, in the forward, the recompute and each of the two gradients that
    go through A (the adapters' and the input's)."""
    adapted = [i for i, layer in enumerate(layers) if isinstance(layer, LoRALinear)]
    if len(adapted) < 2:
        return [layers[i].add_to(part, x) if i in adapted else part for i, part in enumerate(parts)]
    joined = mx.concatenate([layers[i].lora_A for i in adapted], axis=0).astype(x.dtype)
    low_rank = mx.split(x @ joined.T, _bounds([layers[i].lora_A.shape[0] for i in adapted]), axis=-1)
    parts = list(parts)
    for i, z in zip(adapted, low_rank):
        parts[i] = layers[i].add_from_low_rank(parts[i], z)
    return parts


def _bounds(widths: list[int]) -> list[int]:
    """Where to split a concatenation of parts `widths` wide."""
    return [sum(widths[:i + 1]) for i in range(len(widths) - 1)]
