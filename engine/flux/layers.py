"""Building blocks of the FLUX.1 transformer, named like diffusers' modules.

Attribute names follow diffusers' state_dict keys exactly, so weights load
without renaming and LoRA code can wrap any `nn.Linear` by replacing the
attribute (or list item) that holds it.
"""
from __future__ import annotations

import math
from functools import cache

import mlx.core as mx
import mlx.nn as nn

from engine.flux import speed
from engine.flux.rope import apply_rope

TIMESTEP_EMBEDDING_DIM = 256
NORM_EPS = 1e-6


def timestep_embedding(timestep: mx.array, dim: int = TIMESTEP_EMBEDDING_DIM, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding [cos, sin] of a (B,) float timestep, in float32.

    Kept in float32 whatever the model dtype: bf16 would round t*1000 by up to
    ~4 steps, which moves the embedding noticeably.
    """
    half = dim // 2
    frequencies = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    angles = timestep.astype(mx.float32)[:, None] * frequencies[None]
    return mx.concatenate([mx.cos(angles), mx.sin(angles)], axis=-1)


@mx.compile
def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    """adaLN: parameter-free LayerNorm, then a per-sample scale and shift."""
    return mx.fast.layer_norm(x, None, None, NORM_EPS) * (1 + scale) + shift


GELU_TANH_C = math.sqrt(2 / math.pi)


@mx.compile
def _gelu_tanh_float32(x: mx.array) -> mx.array:
    return nn.gelu_approx(x.astype(mx.float32)).astype(x.dtype)


@mx.compile
def _gelu_tanh_backward(x: mx.array, cotangent: mx.array) -> mx.array:
    # d/dx 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3)
    x = x.astype(mx.float32)
    t = mx.tanh(GELU_TANH_C * (x + 0.044715 * x * x * x))
    slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * GELU_TANH_C * (1 + 3 * 0.044715 * x * x)
    return (cotangent.astype(mx.float32) * slope).astype(cotangent.dtype)


@mx.custom_function
def _gelu_tanh_saving_input(x: mx.array) -> mx.array:
    return _gelu_tanh_float32(x)


@_gelu_tanh_saving_input.vjp
def _gelu_tanh_vjp(x, cotangent, output):
    # a one-input custom_function hands its vjp the primal itself, not a tuple
    return _gelu_tanh_backward(x, cotangent)


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (torch's approximate="tanh"), evaluated
    in float32 so bf16 activations lose nothing beyond their final rounding.

    Its backward recomputes the curve from the input, so training keeps only
    the input in its own dtype (not a float32 copy of a 12288-wide activation)."""
    if speed.GELU_SAVES_INPUT:
        return _gelu_tanh_saving_input(x)
    return _gelu_tanh_float32(x)


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2: diffusers' TimestepEmbedding and the
    silu PixArtAlphaTextProjection share this shape and these names."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """The conditioning vector `temb`: timestep (+ guidance) + pooled text."""

    def __init__(self, dim: int, pooled_projection_dim: int, guidance_embeds: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIMESTEP_EMBEDDING_DIM, dim)
        if guidance_embeds:
            self.guidance_embedder = MLPEmbedder(TIMESTEP_EMBEDDING_DIM, dim)
        self.text_embedder = MLPEmbedder(pooled_projection_dim, dim)

    def __call__(self, timestep: mx.array, guidance: mx.array | None, pooled: mx.array) -> mx.array:
        dtype = pooled.dtype
        temb = self.timestep_embedder(timestep_embedding(timestep * 1000).astype(dtype))
        if "guidance_embedder" in self:
            temb = temb + self.guidance_embedder(timestep_embedding(guidance * 1000).astype(dtype))
        return temb + self.text_embedder(pooled)


class AdaptiveModulation(nn.Module):
    """Maps silu(temb) to `count` per-channel vectors (shift, scale, gate, ...),
    each shaped (B, 1, dim) to broadcast over tokens. diffusers' AdaLayerNormZero,
    AdaLayerNormZeroSingle and AdaLayerNormContinuous keep only this linear as
    weights; their LayerNorm has none and lives in `modulate`."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.count = count
        self.linear = nn.Linear(dim, count * dim)

    def __call__(self, activated_temb: mx.array) -> list[mx.array]:
        """`activated_temb` is silu(temb), computed once per call by the transformer for every block."""
        return mx.split(self.linear(activated_temb)[:, None], self.count, axis=-1)


class FluxAttention(nn.Module):
    """Multi-head attention with RMS-normed queries and keys and rotary positions.

    Joint blocks (`joint=True`) also project the text stream with the `add_*`
    layers, attend over [text, image] together and project each stream back
    out; single blocks attend over their one (already joined) sequence and
    leave the output projection to the block.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner_dim = heads * head_dim
        self.to_q = nn.Linear(dim, inner_dim)
        self.to_k = nn.Linear(dim, inner_dim)
        self.to_v = nn.Linear(dim, inner_dim)
        self.norm_q = nn.RMSNorm(head_dim, eps=NORM_EPS)
        self.norm_k = nn.RMSNorm(head_dim, eps=NORM_EPS)
        if joint:
            self.to_out = [nn.Linear(inner_dim, dim)]
            self.add_q_proj = nn.Linear(dim, inner_dim)
            self.add_k_proj = nn.Linear(dim, inner_dim)
            self.add_v_proj = nn.Linear(dim, inner_dim)
            self.norm_added_q = nn.RMSNorm(head_dim, eps=NORM_EPS)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=NORM_EPS)
            self.to_add_out = nn.Linear(inner_dim, dim)

    def _heads(self, projected: mx.array, norm: nn.Module | None = None) -> mx.array:
        """A projection's (B, L, inner) -> (B, L, heads, head_dim): rotary positions apply in this layout, one
        row per token."""
        batch, length, _ = projected.shape
        x = projected.reshape(batch, length, self.heads, self.head_dim)
        return norm(x) if norm is not None else x

    def __call__(self, x: mx.array, rope, context: mx.array | None = None, projected: list | None = None):
        """`projected`: to_q, to_k and to_v's outputs on x, made elsewhere (engine/flux/fused_inputs.py)."""
        if projected is None:
            projected = [self.to_q(x), self.to_k(x), self.to_v(x)]
        query, key, value = (self._heads(p, norm) for p, norm in zip(projected, (self.norm_q, self.norm_k, None)))
        if context is not None:
            # text tokens first, as the rotary ids are ordered
            query = mx.concatenate([self._heads(self.add_q_proj(context), self.norm_added_q), query], axis=1)
            key = mx.concatenate([self._heads(self.add_k_proj(context), self.norm_added_k), key], axis=1)
            value = mx.concatenate([self._heads(self.add_v_proj(context)), value], axis=1)
        # (B, heads, L, head_dim) for the fused attention
        query, key, value = (t.transpose(0, 2, 1, 3) for t in (apply_rope(query, rope), apply_rope(key, rope), value))
        out = attention(query, key, value, self.head_dim**-0.5, backward=_joint_backward() if context is not None else "fused")
        batch, _, length, _ = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(batch, length, -1)
        if context is None:
            return out
        text_length = context.shape[1]
        return self.to_out[0](out[:, text_length:]), self.to_add_out(out[:, :text_length])


def _joint_backward() -> str:
    """Which backward a joint block's attention takes (see `attention`).

    On MLX 0.32.4's CUDA build the fused kernel's own backward (cuDNN) gave NaN gradients in bf16
    for LoRA on FLUX's joint blocks, eager and compiled (bench/NOTES.md, items 14-15); single
    blocks were never hit. Handed contiguous arrays it trains them (speed.CONTIGUOUS_JOINT_ATTENTION:
    full-size style, run 12); without that switch they take the recomputed backward."""
    if not speed.FUSED_ATTENTION_BACKWARD:
        return "recomputed"
    if not speed.on_cuda():
        return "fused"
    return "contiguous" if speed.CONTIGUOUS_JOINT_ATTENTION else "recomputed"


def attention(query: mx.array, key: mx.array, value: mx.array, scale: float, backward: str = "fused") -> mx.array:
    """softmax(q k^T * scale) v over (B, heads, L, head_dim).

    The fused kernel (speed.FAST_SDPA) with, by `backward`: its own backward ("fused"); its own
    backward handed contiguous copies of q, k, v and the incoming gradient ("contiguous"); or
    one that recomputes the softmax with matmuls ("recomputed"). With FAST_SDPA off, plain
    matmuls around a float32 softmax."""
    if not speed.FAST_SDPA:
        scores = (query * scale) @ key.swapaxes(-1, -2)
        return mx.softmax(scores.astype(mx.float32), axis=-1).astype(value.dtype) @ value
    if backward == "recomputed":
        return _attention_recomputing_backward(float(scale))(query, key, value)
    if backward == "contiguous":
        return _attention_contiguous_backward(float(scale))(*(mx.contiguous(t) for t in (query, key, value)))
    return mx.fast.scaled_dot_product_attention(query, key, value, scale=scale)


@cache
def _attention_contiguous_backward(scale: float):
    """The fused attention, whose backward runs on a contiguous copy of the incoming gradient
    (the inputs arrive contiguous). The fused forward runs again inside the backward: its saved
    statistics are internal to MLX's own vjp."""

    def fused(query, key, value):
        return mx.fast.scaled_dot_product_attention(query, key, value, scale=scale)

    @mx.custom_function
    def attend(query, key, value):
        return fused(query, key, value)

    @attend.vjp
    def attend_vjp(primals, cotangent, output):
        _, grads = mx.vjp(fused, list(primals), [mx.contiguous(cotangent)])
        return tuple(grads)

    return attend


# heads per piece of the recomputed backward: a (heads, L, L) float32 block is 226 MB for
# 24 FLUX heads at 1536 tokens; pieces of 8 keep three of them to ~230 MB
ATTENTION_BACKWARD_HEADS = 8


@cache
def _attention_recomputing_backward(scale: float):
    """The fused attention forward with a backward from matmuls: P = softmax(s q k^T) is
    recomputed (in float32) from q and k, so nothing beyond q, k and v is kept, and the
    backward reads neither the fused kernel's output nor its saved statistics.

    What joint blocks take on CUDA (see _joint_backward), and the reference the contiguous
    route was checked against there."""

    @mx.custom_function
    def attend(query, key, value):
        return mx.fast.scaled_dot_product_attention(query, key, value, scale=scale)

    @attend.vjp
    def attend_vjp(primals, cotangent, output):
        query, key, value = primals
        heads = query.shape[1]
        pieces = [slice(start, min(start + ATTENTION_BACKWARD_HEADS, heads))
                  for start in range(0, heads, ATTENTION_BACKWARD_HEADS)]
        grads = [_attention_backward_piece(query[:, h], key[:, h], value[:, h], cotangent[:, h], scale)
                 for h in pieces]
        if len(grads) == 1:
            return grads[0]
        return tuple(mx.concatenate(parts, axis=1) for parts in zip(*grads))

    return attend


def _attention_backward_piece(query, key, value, cotangent, scale):
    # dV = P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(P * dP));  dQ = s dS K;  dK = s dS^T Q
    # (rowsum(P * dP) is the usual rowsum(dO * O), taken from the recomputed P)
    dtype = query.dtype
    cotangent = cotangent.astype(dtype)
    # scores in float32 as the fused forward has them (a bf16 logit of 30 is off by up to 0.1)
    probabilities = mx.softmax((query.astype(mx.float32) * scale) @ key.astype(mx.float32).swapaxes(-1, -2), axis=-1)
    grad_value = probabilities.astype(dtype).swapaxes(-1, -2) @ cotangent
    grad_probabilities = (cotangent @ value.swapaxes(-1, -2)).astype(mx.float32)
    row = mx.sum(probabilities * grad_probabilities, axis=-1, keepdims=True)
    grad_scores = (probabilities * (grad_probabilities - row) * scale).astype(dtype)
    return grad_scores @ key, grad_scores.swapaxes(-1, -2) @ query, grad_value


class GeluProjection(nn.Module):
    """diffusers' GELU(approximate="tanh") module: a linear named `proj`, then GELU."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return gelu_tanh(self.proj(x))


class FeedForward(nn.Module):
    """`net` mirrors diffusers' ModuleList [GELU, Dropout, Linear]; the dropout
    slot holds a parameter-free Identity so the indices (and keys) line up."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = [GeluProjection(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.net[2](self.net[0](x))
