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
# The fused attention's own backward in joint blocks off CUDA, rather than one recomputing the
# softmax with matmuls (engine/flux/layers.py: attention, _joint_backward). Single blocks always
# take the fused one: on CUDA it gave the recomputed one's gradients for them (run 11)
FUSED_ATTENTION_BACKWARD = True
# On CUDA, joint blocks' attention through the fused backward handed contiguous arrays, instead
# of the recomputed backward. It trained a full-width 5-block model with the gradients of the
# recomputed one (run 11) and would make the style step ~0.05 s faster, but it has not run at
# full size yet: off until it has
CONTIGUOUS_JOINT_ATTENTION = False

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
# attention's backward (runs 10-11; engine/flux/layers.py: _joint_backward), so the crash most
# likely shares its cause: a style-shaped model at full width then trained checkpointed, with
# these three on, without fault. Until a full-size run confirms it, checkpointed joint-block
# runs keep MLX's routes here (on every backend; the RoPE and LoRA kernels only run on CUDA).
UNPROVEN_WITH_CHECKPOINTED_JOINT_BLOCKS = ("GELU_SAVES_INPUT", "ROPE_KERNEL", "LORA_KERNELS")


# Our own CUDA kernels are compiled (NVRTC) afresh in every process: MLX keeps its own compiled
# kernels in a disk cache (/tmp/mlx), but none of mx.fast.cuda_kernel's were found there. On an
# H200 (run 11, bench/probe_first_step.py) LoRA's kernels added ~25 s to the first step and
# RoPE's ~6 s; they save ~10 ms and ~3 ms a step (bench/NOTES.md, items 9 and 11). A run of
# fewer steps than compile time / saving finishes sooner without them.
KERNEL_COMPILE_S = {"LORA_KERNELS": 25.0, "ROPE_KERNEL": 6.0}
KERNEL_SAVING_S_PER_STEP = {"LORA_KERNELS": 0.010, "ROPE_KERNEL": 0.003}


def kernels_not_worth_compiling(steps: int) -> list[str]:
    """Our CUDA kernels whose compile time a run of `steps` steps would not win back."""
    return [name for name, seconds in KERNEL_COMPILE_S.items() if steps * KERNEL_SAVING_S_PER_STEP[name] < seconds]


def configure_for_training(gradient_checkpointing: bool, lora_paths, steps: int | None = None) -> list[str]:
    """Reset every switch to its default, then turn off those unproven for this run and, on CUDA,
    the kernels a run of `steps` more steps (None: a long run) would not win back; returns those."""
    globals().update(DEFAULTS)
    off = list(UNPROVEN_WITH_CHECKPOINTED_JOINT_BLOCKS) if gradient_checkpointing and trains_joint_blocks(lora_paths) else []
    if steps is not None and on_cuda():
        off += [name for name in kernels_not_worth_compiling(steps) if name not in off]
    for name in off:
        globals()[name] = False
    return off
