"""CLIP-L's text model, the pooled-prompt encoder of FLUX.1.

Parameter names are transformers' `CLIPTextModel` state_dict names, so the
`text_encoder/` safetensors load with almost no renaming.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from engine.flux.uncompiled import uncompiled

# transformers' CLIP before PR #24773 shipped eos_token_id == 2 in configs
# (FLUX.1's among them); such models pool at the highest token id instead.
LEGACY_EOS_TOKEN_ID = 2
TEXT_MODEL = "text_model."


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = LEGACY_EOS_TOKEN_ID

    @classmethod
    def from_dict(cls, config: dict) -> "CLIPTextConfig":
        """Reads a Hugging Face `text_encoder/config.json`; unknown keys are ignored."""
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in known})


def activation(name: str):
    """The transformers ACT2FN entries text encoders use."""
    functions = {
        "quick_gelu": nn.gelu_fast_approx,  # x * sigmoid(1.702 x), as transformers
        "gelu": nn.gelu,
        "gelu_new": nn.gelu_approx,
        "gelu_pytorch_tanh": nn.gelu_approx,
        "relu": nn.relu,
    }
    if name not in functions:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(functions)}")
    return functions[name]


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        positions = self.position_embedding.weight[: input_ids.shape[1]]
        return self.token_embedding(input_ids) + positions


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.scale = (config.hidden_size // config.num_attention_heads) ** -0.5
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        batch, length, width = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(batch, length, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal")
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, width))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.activation = activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, input_ids: mx.array) -> mx.array:
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))


class CLIPTextModel(nn.Module):
    """`(B, L)` token ids -> `(last_hidden_state (B, L, D), pooled_output (B, D))`."""

    def __init__(self, config: dict | CLIPTextConfig):
        super().__init__()
        if isinstance(config, dict):
            config = CLIPTextConfig.from_dict(config)
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    @uncompiled  # once per prompt: MLX's fused activations would cost a compile for microseconds saved
    def __call__(self, input_ids: mx.array) -> tuple[mx.array, mx.array]:
        x = self.text_model(input_ids)
        return x, x[mx.arange(x.shape[0]), self.pooled_positions(input_ids)]

    def pooled_positions(self, input_ids: mx.array) -> mx.array:
        # argmax returns the first maximum, which matters when pad == eos
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            return mx.argmax(input_ids, axis=-1)
        return mx.argmax((input_ids == self.config.eos_token_id).astype(mx.int32), axis=-1)


def convert_hf_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """transformers' CLIPTextModel weights -> this module's parameters.

    Files on disk name everything `text_model.*`; transformers 5 drops that
    prefix in memory (its state_dict), so both spellings are accepted.
    """
    converted = {}
    for name, value in weights.items():
        if name.endswith("position_ids"):
            continue  # a buffer, rebuilt from the sequence length
        converted[name if name.startswith(TEXT_MODEL) else TEXT_MODEL + name] = value
    return converted


def export_hf_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """This module's parameters -> what transformers' CLIPTextModel.from_pretrained loads."""
    return dict(weights)
