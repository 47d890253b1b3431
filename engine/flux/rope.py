"""Rotary position embedding of FLUX.1: one rotation per (axis, frequency) pair.

Each token has three position ids (FLUX uses (0, row, column) for image
tokens and zeros for text tokens). Head dimensions are split into one block
per axis (`axes_dims`, e.g. 16/56/56) and adjacent pairs of dimensions are
rotated by `position * theta ** (-2i / axis_dim)`, as diffusers' FluxPosEmbed
with `repeat_interleave_real=True` does.
"""
from __future__ import annotations

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


def rope_rotation(ids: mx.array, inverse_frequencies: mx.array, axis_of_pair: mx.array):
    """The rotation of every pair for `apply_rope`, broadcastable over (B, heads, L, head_dim/2, 2).

    `ids` is (L, 3) or (B, L, 3). Returned as (cos, signed sin), float32, shaped
    (B or 1, 1, L, head_dim/2, 1) and (..., 2): x rotated = x * cos + swap(x) * signed sin,
    where swap exchanges the two members of each pair and signed sin is (-sin, +sin).
    (With speed.ROPE_FUSED off: exp(i * angle), complex64, (B or 1, 1, L, head_dim/2).)
    """
    if ids.ndim == 2:
        ids = ids[None]
    positions = mx.take(ids.astype(mx.float32), axis_of_pair, axis=-1)
    angles = (positions * inverse_frequencies)[:, None]
    if not speed.ROPE_FUSED:
        return mx.cos(angles) + 1j * mx.sin(angles)
    sin = mx.sin(angles)[..., None]
    return mx.cos(angles)[..., None], mx.concatenate([-sin, sin], axis=-1)


@mx.compile
def _rotate_pairs_fused(pairs: mx.array, swapped: mx.array, cos: mx.array, signed_sin: mx.array) -> mx.array:
    # one elementwise kernel: reads the input in its own dtype, rotates in float32, writes its dtype
    return (pairs.astype(mx.float32) * cos + swapped.astype(mx.float32) * signed_sin).astype(pairs.dtype)


def _rotate(x: mx.array, cos: mx.array, signed_sin: mx.array) -> mx.array:
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    # a reversed view of each pair, not a copy: the fused kernel reads it with a negative stride
    return _rotate_pairs_fused(pairs, pairs[..., ::-1], cos, signed_sin).reshape(x.shape)


@mx.custom_function
def _rope_fused(x: mx.array, cos: mx.array, signed_sin: mx.array) -> mx.array:
    return _rotate(x, cos, signed_sin)


@_rope_fused.vjp
def _rope_fused_vjp(primals, cotangent, output):
    # a rotation's transpose is the opposite rotation; the angles never need a gradient
    _, cos, signed_sin = primals
    return _rotate(cotangent, cos, -signed_sin), mx.zeros_like(cos), mx.zeros_like(signed_sin)


@mx.custom_function
def _rotate_pairs(x: mx.array, rotation: mx.array) -> mx.array:
    # Each adjacent float32 pair read as one complex number: a single complex
    # multiply, about 3x faster on CUDA than gathering even and odd elements.
    return mx.view(mx.view(x, mx.complex64) * rotation, mx.float32)


@_rotate_pairs.vjp
def _rotate_pairs_vjp(primals, cotangent, output):
    # mx.view has no autodiff; a rotation's transpose is the opposite rotation.
    # The rotation comes from position ids, so it never needs a gradient.
    _, rotation = primals
    return _rotate_pairs(cotangent.astype(mx.float32), mx.conj(rotation)), mx.zeros_like(rotation)


def apply_rope(x: mx.array, rotation) -> mx.array:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the last axis of (B, H, L, D)
    by `rotation` (from `rope_rotation`), in float32 like diffusers; returns x's dtype."""
    if isinstance(rotation, tuple):
        return _rope_fused(x, *rotation)
    return _rotate_pairs(x.astype(mx.float32), rotation).astype(x.dtype)
