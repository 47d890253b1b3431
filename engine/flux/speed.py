"""Switches for the training step's speed work (issue 5), read at trace time.

Each names one optimisation that changes how the step is computed, never what
it computes (tests hold both settings to the same numbers). They are module
attributes so bench/profile_step.py can measure each one's effect in a single
process on the GPU; bench/NOTES.md has what each bought. Changing one after a
step was compiled has no effect on that step: build a new one.
"""
from __future__ import annotations

from functools import cache

import mlx.core as mx

from engine.config import trains_joint_blocks

# GELU's backward from its bf16 input, recomputing the float32 curve, instead
# of autodiff through the float32 round trip (which keeps a float32 copy of the
# 12288-wide MLP activation per block)
GELU_SAVES_INPUT = True
# LoRA's low-rank product added inside its second matmul (mx.addmm) rather than
# by a separate pass over the layer's output
LORA_ADDMM = True
# RoPE as one CUDA kernel on the activation's own dtype (engine/flux/rope.py) instead of a
# float32 copy, a complex multiply and a copy back
ROPE_KERNEL = True
# Dequantize a quantized base with our own CUDA kernel (engine/flux/quantized.py) rather
# than mx.dequantize; elsewhere this has no effect
CUDA_DEQUANTIZE = True
# LoRA's rank-sized products through engine/lora_kernels.py's CUDA kernels instead of
# cuBLAS (which runs such skinny shapes at a few percent of the card's bandwidth)
LORA_KERNELS = True
# Attention through mx.fast.scaled_dot_product_attention (cuDNN on CUDA) rather than two
# matmuls around a float32 softmax (which keeps the (heads, L, L) probabilities for backward)
FAST_SDPA = True
# The fused attention's own backward in joint blocks, rather than one recomputing the softmax
# with matmuls (engine/flux/layers.py: attention); configure_for_training turns it off where it
# failed. Single blocks always keep it: there it gave the recomputed backward's gradients (run 11)
FUSED_ATTENTION_BACKWARD = True

DEFAULTS = {name: value for name, value in dict(globals()).items() if name.isupper()}


@cache
def on_cuda() -> bool:
    """Whether arrays live on an NVIDIA GPU (MLX's CUDA build, GPU the default device): where our kernels run."""
    try:
        return mx.cuda.is_available() and mx.default_device() == mx.gpu
    except AttributeError:  # an MLX without the CUDA module
        return False

# On an H200, a step that checkpoints joint blocks it trains through (the style template:
# LoRA on joint blocks 5-15, gradient checkpointing on) hit an illegal memory access twice
# (run 9). The same runs without checkpointing trained to NaN, and that was traced to the fused
# attention's backward (run 10, below), so the crash most likely shares its cause: a
# style-shaped model at full width then trained checkpointed, with these three on, without
# fault. Until a full-size run confirms it, checkpointed joint-block runs keep MLX's routes here.
UNPROVEN_WITH_CHECKPOINTED_JOINT_BLOCKS = ("GELU_SAVES_INPUT", "ROPE_KERNEL", "LORA_KERNELS")
# On CUDA (MLX 0.32.4), bf16 gradients through the fused attention's backward came out NaN
# once LoRA trained FLUX's joint blocks, with every other switch off and without compiling;
# float32, or attention without the fused backward, trained (bench/NOTES.md, item 14).
FAILED_WITH_JOINT_BLOCKS_ON_CUDA = ("FUSED_ATTENTION_BACKWARD",)


def configure_for_training(gradient_checkpointing: bool, lora_paths, cuda: bool | None = None) -> list[str]:
    """Reset every switch to its default, then turn off those that failed or are unproven for
    this run (`cuda`: whether it runs on CUDA, found out when None); returns those."""
    globals().update(DEFAULTS)
    if not trains_joint_blocks(lora_paths):
        return []
    off = list(FAILED_WITH_JOINT_BLOCKS_ON_CUDA) if (on_cuda() if cuda is None else cuda) else []
    if gradient_checkpointing:
        off += UNPROVEN_WITH_CHECKPOINTED_JOINT_BLOCKS
    for name in off:
        globals()[name] = False
    return off
