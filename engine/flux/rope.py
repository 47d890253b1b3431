"""Rotary position embedding of FLUX.1: one rotation per (axis, frequency) pair.

Each token has three position ids (FLUX uses (0, row, column) for image
tokens and zeros for text tokens). Head dimensions are split into one block
per axis (`axes_dims`, e.g. 16/56/56) and adjacent pairs of dimensions are
rotated by `position * theta ** (-2i / axis_dim)`, as diffusers' FluxPosEmbed
with `repeat_interleave_real=True` does.
"""
from __future__ import annotations

from functools import cache
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from engine.flux import speed


def rope_inverse_frequencies(axes_dims: list[int], theta: float = 10000.0) -> tuple[mx.array, mx.array]:
    """Per rotated pair: its inverse frequency and the id axis it reads.

    Computed once per model in float64, then stored as float32, so the
    per-call work is a single gather and multiply.
    """
    frequencies, axis_of_pair = [], []
    for axis, dim in enumerate(axes_dims):
        if dim % 2:
            raise ValueError(f"every axes_dims_rope entry must be even, got {list(axes_dims)}")
        exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
        frequencies.append(1.0 / theta**exponents)
        axis_of_pair.append(np.full(dim // 2, axis, dtype=np.int32))
    return (
        mx.array(np.concatenate(frequencies).astype(np.float32)),
        mx.array(np.concatenate(axis_of_pair)),
    )


class Rotation(NamedTuple):
    """The rotation of every (token, pair) as `rope_rotation` builds it, shaped (B or 1, L, 1, head_dim/2)."""

    cos: mx.array  # float32
    sin: mx.array  # float32
    complex: mx.array  # cos + i sin, complex64 (the path without the CUDA kernel)


def rope_rotation(ids: mx.array, inverse_frequencies: mx.array, axis_of_pair: mx.array) -> Rotation:
    """exp(i * angle) of every rotated pair, broadcastable against (B, L, heads, head_dim/2).

    `ids` is (L, 3) or (B, L, 3). Built once per transformer call for all blocks.
    """
    if ids.ndim == 2:
        ids = ids[None]
    positions = mx.take(ids.astype(mx.float32), axis_of_pair, axis=-1)
    angles = (positions * inverse_frequencies)[:, :, None]
    cos, sin = mx.cos(angles), mx.sin(angles)
    return Rotation(cos, sin, cos + 1j * sin)


# One thread per rotated pair of x (B, L, H, D), read and written in x's dtype, rotated in float32;
# BACKWARD rotates the other way (the vjp). cos/sin are (RB, L, HALF) with RB 1 or B. The shapes are
# read at run time, so a process compiles the kernel once per dtype and direction, not once per
# resolution (MLX keeps no custom kernel on disk: bench/NOTES.md item 37).
_ROPE_SOURCE = """
    const long long L = x_shape[1];
    const long long H = x_shape[2];
    const long long HALF = x_shape[3] / 2;
    const long long RB = cos_shape[0];
    const long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= x_shape[0] * L * H * HALF) {
        return;
    }
    const long long token = index / (H * HALF);
    const long long r = (RB == 1 ? token % L : token) * HALF + index % HALF;
    const float c = cos[r];
    const float s = BACKWARD ? -sin[r] : sin[r];
    const float x0 = static_cast<float>(x[2 * index]);
    const float x1 = static_cast<float>(x[2 * index + 1]);
    out[2 * index] = static_cast<T>(x0 * c - x1 * s);
    out[2 * index + 1] = static_cast<T>(x0 * s + x1 * c);
"""


@cache
def _rope_kernel():
    return mx.fast.cuda_kernel(name="flux_rope_pairs", input_names=["x", "cos", "sin"], output_names=["out"],
                               source=_ROPE_SOURCE)


def _rope_cuda(x: mx.array, cos: mx.array, sin: mx.array, backward: bool) -> mx.array:
    pairs = x.size // 2
    return _rope_kernel()(
        inputs=[x, cos, sin],
        template=[("T", x.dtype), ("BACKWARD", backward)],
        grid=((pairs + 255) // 256 * 256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[x.shape],
        output_dtypes=[x.dtype])[0]


@mx.custom_function
def _rope_with_kernel(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    return _rope_cuda(x, cos, sin, False)


@_rope_with_kernel.vjp
def _rope_with_kernel_vjp(primals, cotangent, output):
    # a rotation's transpose is the opposite rotation; the angles never need a gradient
    _, cos, sin = primals
    return _rope_cuda(cotangent.astype(output.dtype), cos, sin, True), mx.zeros_like(cos), mx.zeros_like(sin)


def _rotate_float32(x: mx.array, rotation: mx.array) -> mx.array:
    # Each adjacent float32 pair read as one complex number: a single complex
    # multiply, about 3x faster on CUDA than gathering even and odd elements.
    return mx.view(mx.view(x.astype(mx.float32), mx.complex64) * rotation, mx.float32).astype(x.dtype)


@mx.custom_function
def _rotate_pairs(x: mx.array, rotation: mx.array) -> mx.array:
    # x in its own dtype: training keeps it (for the vjp), never a float32 copy of it
    return _rotate_float32(x, rotation)


@_rotate_pairs.vjp
def _rotate_pairs_vjp(primals, cotangent, output):
    # mx.view has no autodiff; a rotation's transpose is the opposite rotation.
    # The rotation comes from position ids, so it never needs a gradient.
    _, rotation = primals
    return _rotate_float32(cotangent.astype(output.dtype), mx.conj(rotation)), mx.zeros_like(rotation)


def apply_rope(x: mx.array, rotation: Rotation) -> mx.array:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the last axis of x (B, L, H, D) by `rotation`
    (from `rope_rotation`), in float32 like diffusers; returns x's dtype. On CUDA, for bf16/fp16,
    one kernel reads and writes x once (the float32 route copies it there and back)."""
    if speed.ROPE_KERNEL and speed.on_cuda() and x.dtype in (mx.bfloat16, mx.float16) and x.shape[-1] % 2 == 0:
        batch, length = x.shape[:2]
        cos, sin = (a.reshape(a.shape[0], length, -1) for a in (rotation.cos, rotation.sin))
        if cos.shape[0] in (1, batch):
            return _rope_with_kernel(x, cos, sin)
    return _rotate_pairs(x, rotation.complex)
