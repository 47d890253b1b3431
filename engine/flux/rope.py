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


def rope_cos_sin(ids: mx.array, inverse_frequencies: mx.array, axis_of_pair: mx.array) -> tuple[mx.array, mx.array]:
    """cos and sin of every rotation angle, float32, shaped (B or 1, 1, L, head_dim/2).

    `ids` is (L, 3) or (B, L, 3). The singleton head axis lets the result
    broadcast against queries and keys laid out as (B, heads, L, head_dim).
    """
    if ids.ndim == 2:
        ids = ids[None]
    positions = mx.take(ids.astype(mx.float32), axis_of_pair, axis=-1)
    angles = (positions * inverse_frequencies)[:, None]
    return mx.cos(angles), mx.sin(angles)


@mx.compile
def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the last axis of (B, H, L, D).

    The rotation runs in float32 (like diffusers) and returns x's dtype;
    compiled, so the elementwise work is one fused kernel on the GPU.
    """
    pairs = x.astype(mx.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = mx.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
