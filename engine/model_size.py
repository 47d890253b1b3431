"""What a FLUX.1 model weighs, from its components' config.json alone (built in for the Hub's
FLUX.1 models and the tiny one, read from a local folder, never downloaded): every linear of the
transformer by name (as LoRA targets name them), the parameter counts of T5, CLIP and the VAE,
and a linear's bytes at a given quantization. engine/memory.py builds its estimate on these."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# as engine.flux.loading.quantize_module: groups of 64 along the input, else 32, else not quantized
QUANTIZE_GROUP_SIZES = (64, 32)
CLIP_TOKENS = 77
# a FLUX block's MLP is 4x the hidden width (diffusers FluxTransformerBlock / FluxSingleTransformerBlock)
MLP_RATIO = 4
TIMESTEP_EMBEDDING_DIM = 256
# the tiny model's tokenizers are built at first use; their vocabularies are about this size
TINY_VOCAB_SIZE = 1000

# The published configs of FLUX.1 (diffusers layout), so an estimate needs no download.
FLUX1_DEV_TRANSFORMER = {
    "num_layers": 19, "num_single_layers": 38, "num_attention_heads": 24, "attention_head_dim": 128,
    "joint_attention_dim": 4096, "pooled_projection_dim": 768, "in_channels": 64, "patch_size": 1,
    "guidance_embeds": True,
}  # fmt: skip
FLUX1_SCHNELL_TRANSFORMER = dict(FLUX1_DEV_TRANSFORMER, guidance_embeds=False)
FLUX1_T5 = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
            "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu"}
FLUX1_CLIP = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "vocab_size": 49408,
              "max_position_embeddings": 77}
FLUX1_VAE = {"in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
             "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
             "mid_block_add_attention": True}


@dataclass(frozen=True)
class ModelConfigs:
    """The config.json dicts of a model's components (transformer, T5, CLIP, VAE)."""

    transformer: dict
    t5: dict = field(default_factory=lambda: dict(FLUX1_T5))
    clip: dict = field(default_factory=lambda: dict(FLUX1_CLIP))
    vae: dict = field(default_factory=lambda: dict(FLUX1_VAE))
    tokenizer_max_length: int | None = None  # tokenizer_2's model_max_length, when smaller than FLUX's

    @property
    def t5_length(self) -> int:
        # as FluxModel.t5_max_length: dev was trained with 512 T5 tokens, schnell with 256
        length = 512 if self.transformer.get("guidance_embeds") else 256
        return min(length, self.tokenizer_max_length) if self.tokenizer_max_length else length


def transformer_linears(config: dict) -> dict[str, tuple[int, int]]:
    """Every linear of the FLUX transformer, path (diffusers names) -> (in, out); all have a bias."""
    dim = config.get("num_attention_heads", 24) * config.get("attention_head_dim", 128)
    mlp = MLP_RATIO * dim
    patch = config.get("patch_size", 1)
    out_channels = config.get("out_channels") or config.get("in_channels", 64)
    linears = {
        "x_embedder": (config.get("in_channels", 64), dim),
        "context_embedder": (config.get("joint_attention_dim", 4096), dim),
        "time_text_embed.timestep_embedder.linear_1": (TIMESTEP_EMBEDDING_DIM, dim),
        "time_text_embed.timestep_embedder.linear_2": (dim, dim),
    }
    if config.get("guidance_embeds"):
        linears["time_text_embed.guidance_embedder.linear_1"] = (TIMESTEP_EMBEDDING_DIM, dim)
        linears["time_text_embed.guidance_embedder.linear_2"] = (dim, dim)
    linears["time_text_embed.text_embedder.linear_1"] = (config.get("pooled_projection_dim", 768), dim)
    linears["time_text_embed.text_embedder.linear_2"] = (dim, dim)
    joint = {"norm1.linear": (dim, 6 * dim), "norm1_context.linear": (dim, 6 * dim),
             "ff.net.0.proj": (dim, mlp), "ff.net.2": (mlp, dim),
             "ff_context.net.0.proj": (dim, mlp), "ff_context.net.2": (mlp, dim)}
    for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        joint[f"attn.{name}"] = (dim, dim)
    single = {"norm.linear": (dim, 3 * dim), "proj_mlp": (dim, mlp), "proj_out": (dim + mlp, dim),
              "attn.to_q": (dim, dim), "attn.to_k": (dim, dim), "attn.to_v": (dim, dim)}
    for i in range(config.get("num_layers", 19)):
        linears.update({f"transformer_blocks.{i}.{name}": shape for name, shape in joint.items()})
    for i in range(config.get("num_single_layers", 38)):
        linears.update({f"single_transformer_blocks.{i}.{name}": shape for name, shape in single.items()})
    linears["norm_out.linear"] = (dim, 2 * dim)
    linears["proj_out"] = (dim, patch * patch * out_channels)
    return linears


def transformer_norm_parameters(config: dict) -> int:
    # RMSNorm weights of queries and keys: four per joint block, two per single block
    head_dim = config.get("attention_head_dim", 128)
    return head_dim * (4 * config.get("num_layers", 19) + 2 * config.get("num_single_layers", 38))


def transformer_parameter_count(config: dict) -> int:
    return (sum(i * o + o for i, o in transformer_linears(config).values())
            + transformer_norm_parameters(config))


def t5_linears(config: dict) -> list[tuple[int, int]]:
    d_model, d_ff = config.get("d_model", 4096), config.get("d_ff", 10240)
    inner = config.get("num_heads", 64) * config.get("d_kv", 64)
    gated = str(config.get("feed_forward_proj", "gated-gelu")).startswith("gated")
    layer = [(d_model, inner)] * 3 + [(inner, d_model)] + [(d_model, d_ff)] * (2 if gated else 1) + [(d_ff, d_model)]
    return layer * config.get("num_layers", 24)


def t5_other_parameters(config: dict) -> int:
    d_model = config.get("d_model", 4096)
    # embedding, two layer norms per layer plus the final one, relative position bias of layer 0
    return (config.get("vocab_size", 32128) * d_model + (2 * config.get("num_layers", 24) + 1) * d_model
            + config.get("relative_attention_num_buckets", 32) * config.get("num_heads", 64))


def clip_linears(config: dict) -> list[tuple[int, int]]:
    hidden, inner = config.get("hidden_size", 768), config.get("intermediate_size", 3072)
    return ([(hidden, hidden)] * 4 + [(hidden, inner), (inner, hidden)]) * config.get("num_hidden_layers", 12)


def clip_other_parameters(config: dict) -> int:
    hidden = config.get("hidden_size", 768)
    # token and position embeddings, two layer norms per layer plus the final one
    embeddings = (config.get("vocab_size", 49408) + config.get("max_position_embeddings", CLIP_TOKENS)) * hidden
    return embeddings + (2 * config.get("num_hidden_layers", 12) + 1) * 2 * hidden


def text_encoder_parameter_counts(model: ModelConfigs) -> tuple[int, int]:
    """(T5, CLIP) parameter counts."""
    t5 = sum(i * o for i, o in t5_linears(model.t5)) + t5_other_parameters(model.t5)
    clip = sum(i * o + o for i, o in clip_linears(model.clip)) + clip_other_parameters(model.clip)
    return t5, clip


def vae_parameter_counts(config: dict) -> tuple[int, int]:
    """(encoder, decoder) parameter counts of a diffusers AutoencoderKL."""
    channels = list(config.get("block_out_channels", FLUX1_VAE["block_out_channels"]))
    layers = config.get("layers_per_block", 2)
    latent = config.get("latent_channels", 16)

    def conv(i: int, o: int, k: int = 3) -> int:
        return k * k * i * o + o

    def resnet(i: int, o: int) -> int:
        return 2 * i + conv(i, o) + 2 * o + conv(o, o) + (conv(i, o, 1) if i != o else 0)

    def mid(c: int) -> int:
        attention = 2 * c + 4 * (c * c + c) if config.get("mid_block_add_attention", True) else 0
        return 2 * resnet(c, c) + attention

    encoder = conv(config.get("in_channels", 3), channels[0]) + mid(channels[-1])
    encoder += 2 * channels[-1] + conv(channels[-1], 2 * latent)
    for i, out in enumerate(channels):
        encoder += resnet(channels[max(i - 1, 0)], out) + (layers - 1) * resnet(out, out)
        encoder += conv(out, out) if i < len(channels) - 1 else 0
    if config.get("use_quant_conv", True):
        encoder += conv(2 * latent, 2 * latent, 1)
    reverse = channels[::-1]
    decoder = conv(latent, reverse[0]) + mid(reverse[0])
    decoder += 2 * reverse[-1] + conv(reverse[-1], config.get("out_channels", 3))
    for i, out in enumerate(reverse):
        decoder += resnet(reverse[max(i - 1, 0)], out) + layers * resnet(out, out)
        decoder += conv(out, out) if i < len(reverse) - 1 else 0
    if config.get("use_post_quant_conv", True):
        decoder += conv(latent, latent, 1)
    return encoder, decoder


def linear_bytes(in_features: int, out_features: int, bits: int | None, dtype_bytes: int, bias: bool = True) -> int:
    """A linear's weights: quantized to `bits` with a scale and a bias per group (in the compute
    dtype) where the input width allows a group size, else unquantized."""
    bias_bytes = out_features * dtype_bytes if bias else 0
    group = next((g for g in QUANTIZE_GROUP_SIZES if in_features % g == 0), None) if bits else None
    if group is None:
        return in_features * out_features * dtype_bytes + bias_bytes
    weights = in_features * out_features
    return math.ceil(weights * bits / 8) + 2 * (weights // group) * dtype_bytes + bias_bytes


def model_configs_for(model: str, base_dir: Path | None = None) -> ModelConfigs:
    """The configs of `model` without downloading: built in for dev, schnell and Hub repos, the tiny
    model's own, or read from a local folder's */config.json."""
    from engine.config import model_source
    from engine.errors import ModelLoadError

    kind, where = model_source(model, base_dir)
    if kind == "tiny":
        from engine.flux import tiny

        return ModelConfigs(transformer=dict(tiny.TRANSFORMER_CONFIG, joint_attention_dim=tiny.T5_CONFIG["d_model"],
                                             pooled_projection_dim=tiny.CLIP_CONFIG["hidden_size"]),
                            t5=dict(tiny.T5_CONFIG, vocab_size=TINY_VOCAB_SIZE),
                            clip=dict(tiny.CLIP_CONFIG, vocab_size=TINY_VOCAB_SIZE), vae=dict(tiny.VAE_CONFIG),
                            tokenizer_max_length=tiny.TINY_T5_LENGTH)
    if kind == "hub":
        # FLUX.1 fine-tunes on the Hub share the architecture; only schnell lacks the guidance embedder
        schnell = "schnell" in where.lower()
        return ModelConfigs(transformer=dict(FLUX1_SCHNELL_TRANSFORMER if schnell else FLUX1_DEV_TRANSFORMER))
    if kind == "local":
        folder = Path(where)
        transformer = _read_json(folder / "transformer" / "config.json")
        if transformer is None:
            raise ModelLoadError(f"{folder} has no readable transformer/config.json",
                                 "point `model` at a FLUX.1 folder in the diffusers layout")
        return ModelConfigs(transformer=transformer,
                            t5=_read_json(folder / "text_encoder_2" / "config.json") or dict(FLUX1_T5),
                            clip=_read_json(folder / "text_encoder" / "config.json") or dict(FLUX1_CLIP),
                            vae=_read_json(folder / "vae" / "config.json") or dict(FLUX1_VAE),
                            tokenizer_max_length=(_read_json(folder / "tokenizer_2" / "tokenizer_config.json")
                                                  or {}).get("model_max_length"))
    raise ModelLoadError(f"model {model!r} is not dev, schnell, tiny, a Hugging Face repo id or a folder",
                         "fix `model` in the training config")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
