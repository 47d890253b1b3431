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
    """The rotation of every (token, pair) as `rope_rotation` builds it. cos and sin are shaped
    (B or 1, L, 1, head_dim/2); the other four (B or 1, L, 1, head_dim/2, 2) hold what an even or
    an odd element of a pair contributes to the rotated pair (even, odd): `by_even` = (cos, sin),
    `by_odd` = (-sin, cos), and the same for the opposite rotation (the vjp's), `back_by_even` =
    (cos, -sin), `back_by_odd` = (sin, cos). All float32."""

    cos: mx.array
    sin: mx.array
    by_even: mx.array
    by_odd: mx.array
    back_by_even: mx.array
    back_by_odd: mx.array


def rope_rotation(ids: mx.array, inverse_frequencies: mx.array, axis_of_pair: mx.array) -> Rotation:
    """The rotation of every rotated pair, broadcastable against (B, L, heads, head_dim/2).

    `ids` is (L, 3) or (B, L, 3). Built once per transformer call for all blocks.
    """
    if ids.ndim == 2:
        ids = ids[None]
    positions = mx.take(ids.astype(mx.float32), axis_of_pair, axis=-1)
    angles = (positions * inverse_frequencies)[:, :, None]
    cos, sin = mx.cos(angles), mx.sin(angles)
    return Rotation(cos, sin, mx.stack([cos, sin], axis=-1), mx.stack([-sin, cos], axis=-1),
                    mx.stack([cos, -sin], axis=-1), mx.stack([sin, cos], axis=-1))


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


def _turn_pairs(x: mx.array, by_even: mx.array, by_odd: mx.array) -> mx.array:
    # The even and odd elements are strided views of x (no copy), each broadcast over its pair, so
    # inside a compiled step the casts, the four products and the sum are one elementwise kernel that
    # reads x and writes the result once, in x's dtype, with the arithmetic in float32 (as diffusers).
    # The route before it (x copied to float32, viewed as complex64, multiplied, copied back) took
    # three kernels and two float32 copies of x; the values are the same (tests/test_rope.py). On an
    # H100 this kernel takes ~46 us a call at FLUX's size (its strided reads), our CUDA kernel ~13:
    # the steps were 0.6-0.8% faster than with the old route, 3-5 ms slower than with ours (run 22).
    even, odd = x[..., 0::2, None], x[..., 1::2, None]
    turned = even.astype(mx.float32) * by_even + odd.astype(mx.float32) * by_odd
    return turned.astype(x.dtype).reshape(x.shape)


@mx.custom_function
def _rotate_pairs(x: mx.array, by_even: mx.array, by_odd: mx.array, back_by_even: mx.array,
                  back_by_odd: mx.array) -> mx.array:
    # x in its own dtype: training keeps it (for the vjp), never a float32 copy of it
    return _turn_pairs(x, by_even, by_odd)


@_rotate_pairs.vjp
def _rotate_pairs_vjp(primals, cotangent, output):
    # a rotation's transpose is the opposite rotation (autodiff of the strided views would scatter
    # into zeros); the angles come from position ids and never need a gradient
    _, *tables = primals
    back_by_even, back_by_odd = tables[2:]
    turned = _turn_pairs(cotangent.astype(output.dtype), back_by_even, back_by_odd)
    return (turned, *(mx.zeros_like(table) for table in tables))


def apply_rope(x: mx.array, rotation: Rotation) -> mx.array:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the last axis of x (B, L, H, D) by `rotation`
    (from `rope_rotation`), in float32 like diffusers; returns x's dtype. Either route is one kernel
    that reads and writes x once inside a compiled step: on CUDA, for bf16/fp16 with ROPE_KERNEL,
    ours (compiled afresh by each process); elsewhere, or without it, the elementwise one MLX fuses
    from `_turn_pairs` (kept in MLX's kernel cache on disk)."""
    if speed.ROPE_KERNEL and speed.on_cuda() and x.dtype in (mx.bfloat16, mx.float16) and x.shape[-1] % 2 == 0:
        batch, length = x.shape[:2]
        cos, sin = (a.reshape(a.shape[0], length, -1) for a in (rotation.cos, rotation.sin))
        if cos.shape[0] in (1, batch):
            return _rope_with_kernel(x, cos, sin)
    return _rotate_pairs(x, rotation.by_even, rotation.by_odd, rotation.back_by_even, rotation.back_by_odd)
