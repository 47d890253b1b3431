"""T5-XXL's encoder (v1.1), the per-token prompt encoder of FLUX.1.

Parameter names are transformers' `T5EncoderModel` state_dict names, so the
`text_encoder_2/` safetensors load with almost no renaming. FLUX's pipeline
passes no attention mask, so padding tokens are attended: so are they here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.flux.clip import activation
from engine.flux.uncompiled import uncompiled

SHARED_EMBEDDING = "shared.weight"
TIED_EMBEDDING = "encoder.embed_tokens.weight"


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_dict(cls, config: dict) -> "T5Config":
        """Reads a Hugging Face `text_encoder_2/config.json`; unknown keys are ignored."""
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in known})

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_activation(self) -> str:
        # transformers' T5Config maps "gated-gelu" to the tanh approximation, as T5 v1.1 was trained
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]


@lru_cache(maxsize=8)
def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets of key - query offsets, (length, length) int32.

    Computed in float32 numpy with the same operations as transformers, so the
    logarithmic bucket edges truncate to the same integers.
    """
    positions = np.arange(length, dtype=np.int64)
    relative = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        scaled = (
            np.log(distance.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(half - max_exact)
        )
    large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    buckets += np.where(distance < max_exact, distance, large)
    return buckets.astype(np.int32)


class T5LayerNorm(nn.Module):
    """Scale-only RMS norm; mx.fast.rms_norm accumulates in float32 even for bf16."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.num_buckets = config.relative_attention_num_buckets
            self.max_distance = config.relative_attention_max_distance
            self.relative_attention_bias = nn.Embedding(self.num_buckets, config.num_heads)

    def position_bias(self, length: int) -> mx.array:
        """(1, heads, length, length) additive bias, shared by every layer."""
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance)
        bias = self.relative_attention_bias(mx.array(buckets))
        return bias.transpose(2, 0, 1)[None]

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        batch, length, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(batch, length, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # T5 folds the 1/sqrt(d) scale into its initialisation: none here
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=position_bias.astype(q.dtype))
        return self.o(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        return x + self.SelfAttention(self.layer_norm(x), position_bias)


class T5DenseReluDense(nn.Module):
    """`wo(act(wi_0 x) * wi_1 x)` when gated (v1.1, FLUX), else `wo(act(wi x))`."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.activation = activation(config.dense_activation)
        self.is_gated = config.is_gated
        if self.is_gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if self.is_gated:
            return self.wo(self.activation(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self.activation(self.wi(x)))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = [T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)]

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        return self.layer[1](self.layer[0](x, position_bias))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        # only the first block owns the relative position table; the rest reuse its bias
        self.block = [T5Block(config, has_relative_attention_bias=i == 0) for i in range(config.num_layers)]
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array) -> mx.array:
        position_bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])
        for block in self.block:
            x = block(x, position_bias)
        return self.final_layer_norm(x)


class T5Encoder(nn.Module):
    """`(B, L)` token ids -> last_hidden_state `(B, L, d_model)`."""

    def __init__(self, config: dict | T5Config):
        super().__init__()
        if isinstance(config, dict):
            config = T5Config.from_dict(config)
        self.config = config
        # transformers ties encoder.embed_tokens to shared; here there is only `shared`
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    @uncompiled  # once per prompt: MLX's fused activations would cost a compile for microseconds saved
    def __call__(self, input_ids: mx.array) -> mx.array:
        return self.encoder(self.shared(input_ids))


def convert_hf_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """transformers' T5EncoderModel state_dict (either tied embedding name, or both) -> this module's parameters."""
    converted = {name: value for name, value in weights.items() if name != TIED_EMBEDDING}
    if SHARED_EMBEDDING not in converted and TIED_EMBEDDING in weights:
        converted[SHARED_EMBEDDING] = weights[TIED_EMBEDDING]
    return converted


def export_hf_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """This module's parameters -> what transformers' T5EncoderModel.from_pretrained loads.

    Both embedding names are written, as torch's state_dict holds both, so
    loaders that do not tie weights find the one they look for.
    """
    exported = dict(weights)
    if SHARED_EMBEDDING in exported:
        exported[TIED_EMBEDDING] = exported[SHARED_EMBEDDING]
    return exported
