"""A frozen linear layer and its LoRA as one differentiable function (engine/lora.py's LoRALinear
calls it over a plain or dequantizing base): the forward adds LoRA's product inside the kernel that
makes it, the backward gives the input's gradient as one product and the adapter's gradients directly.
The rank-sized products go through engine/lora_kernels.py, which picks our CUDA kernels or matmuls."""
from __future__ import annotations

from functools import cache

import mlx.core as mx

from engine.lora_kernels import add_low_rank, reduce_outer, skinny_matmul


def _lora_linear_pieces(quantized: tuple | None, with_bias: bool):
    """(forward(x, A, B_scaled, arrays), backward(x, cotangent, A, B_scaled, arrays, float32, scale_of_B))
    of a frozen linear with its LoRA, A and B_scaled in x's dtype or cast to it; backward returns the
    gradients of x, A and B (B's times `scale_of_B`). The base's arrays are its dense weight or, when
    `quantized` is (group_size, bits, mode), its packed ones, then its bias when `with_bias`."""
    from engine.flux.quantized import dense_after, plus_bias

    def dense(weight, trigger):
        return weight[0].astype(trigger.dtype) if quantized is None else dense_after(trigger, weight, *quantized)

    def split(arrays):
        weight = arrays[:1] if quantized is None else arrays[:3]
        return weight, (arrays[len(weight)] if with_bias else None)

    def forward(x, lora_A, lora_B_scaled, arrays):
        weight, bias = split(arrays)
        return add_low_rank(plus_bias(x, dense(weight, x), bias), skinny_matmul(x, lora_A), lora_B_scaled)

    def backward(x, cotangent, lora_A, lora_B_scaled, arrays, float32: bool = True, scale_of_B: float = 1.0):
        weight, _ = split(arrays)
        cotangent = cotangent.astype(x.dtype)
        dz = skinny_matmul(cotangent, lora_B_scaled, transposed=True)  # cotangent @ B: (..., rank)
        grad_x = add_low_rank(cotangent @ dense(weight, cotangent), dz, lora_A, transposed=True)
        grad_A = reduce_outer(dz, x, float32=float32)  # dz.T @ x: (rank, in)
        grad_B = reduce_outer(skinny_matmul(x, lora_A), cotangent, float32=float32)  # z.T @ cotangent
        if scale_of_B != 1.0:  # before the transpose: the multiply joins reduce_outer's cast to float32
            grad_B = grad_B * scale_of_B
        return grad_x, grad_A, grad_B.T  # B's as (out, rank)

    return forward, backward


@cache
def lora_linear(quantized: tuple | None, with_bias: bool, scale: float = 1.0):
    """A frozen linear and its LoRA as one function: x @ W.T (+ bias) + scale * (x @ A.T) @ B.T, called
    as f(x, lora_A, lora_B, *weight, *bias) with A and B the float32 masters. `weight` is the dense W,
    or, when `quantized` is (group_size, bits, mode), the packed (wq, scales, biases), dequantized in the
    forward and again in the backward (as engine/flux/quantized.py's dequantized_matmul does).

    Autodiff of the base and lora_update apart computes the input's gradient as two products and
    their sum; here LoRA's product is added inside the kernel that computes it, so a layer's backward
    holds one (tokens x in) tensor fewer (5 for a single block's proj_out) and runs one kernel fewer.
    Nor is the base's output kept for the backward, which never reads it.

    The scale is a constant of the function, applied inside it: B's scaling joins its cast to x's
    dtype in one kernel, and B's gradient is scaled inside the kernel that casts it to float32. Scaled
    outside (a primal B * scale), each was a kernel of its own, in every forward (the product is an
    input of the custom function, so MLX keeps it) and in every backward (the chain rule's multiply):
    420 of a checkpointed people 4-bit step's kernels (6585 left, counted on CPU), most of them a
    multiply by 1.0 (bench/NOTES.md item 49). The values are the same to the bit."""
    compute, gradients = _lora_linear_pieces(quantized, with_bias)

    def scaled(lora_B):
        return lora_B if scale == 1.0 else lora_B * scale

    @mx.custom_function
    def forward(x, lora_A, lora_B, *arrays):
        return compute(x, lora_A, scaled(lora_B), arrays)

    @forward.vjp
    def backward(primals, cotangent, output):
        x, lora_A, lora_B, *arrays = primals
        grads = gradients(x, cotangent, lora_A, scaled(lora_B), arrays, scale_of_B=scale)
        # the frozen base gets no gradient; zeros are never evaluated
        return (*grads, *(mx.zeros_like(a) for a in arrays))

    return forward


@cache
def lora_linear_from_copies(quantized: tuple | None, with_bias: bool, scale: float):
    """lora_linear for a training step that keeps each adapter's compute copies (engine/lora.py:
    ComputeCopies): f(x, lora_A, lora_B, compute_A, compute_B, *weight, *bias), with compute_A = A and
    compute_B = scale * B in x's dtype, made once a step by the optimizer update. The forward and
    backward read only the copies; the float32 masters are inputs so that their gradients (the scale
    applied) come out here, in x's dtype when the scale is 1 (what training uses; the products are
    rounded to it anyway): a step must pass them through `float32_gradients` inside its update.

    It saves the 3 small kernels a layer that casting and scaling the masters takes in each forward, and
    about 6 in each backward; on an H100 that bought 1.4% (bench/NOTES.md item 42), so it is off."""
    compute, gradients = _lora_linear_pieces(quantized, with_bias)

    @mx.custom_function
    def forward(x, lora_A, lora_B, compute_A, compute_B, *arrays):
        return compute(x, compute_A, compute_B, arrays)

    @forward.vjp
    def backward(primals, cotangent, output):
        x, lora_A, lora_B, compute_A, compute_B, *arrays = primals
        exact = scale == 1.0  # else the scale is applied in float32
        grads = gradients(x, cotangent, compute_A, compute_B, arrays, float32=not exact, scale_of_B=scale)
        # neither the frozen base nor the copies get a gradient; zeros are never evaluated
        return (*grads, *(mx.zeros_like(a) for a in (compute_A, compute_B, *arrays)))

    return forward


def float32_gradients(gradients, parameters):
    """Each gradient in its parameter's dtype (float32 for LoRA's masters): inside a compiled optimizer
    update, where each cast joins that parameter's update kernel."""
    from mlx.utils import tree_map

    return tree_map(lambda gradient, parameter: gradient.astype(parameter.dtype), gradients, parameters)
