"""The built-in `tiny` model: FLUX.1-dev's architecture (all 19 + 38 blocks) at ~25 MB.

Made locally from a fixed seed in exactly the Hugging Face diffusers layout
(model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/,
tokenizer/, tokenizer_2/, scheduler/), so the demo and the tests exercise the
same loading code as the real weights, and diffusers/transformers load it too.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from engine.paths import cache_dir

log = logging.getLogger(__name__)

TINY_VERSION = "tiny-v2"  # bump whenever the tiny configs or weights change: caches are keyed by it
# T5 tokens of the tiny model (FLUX.1-dev: 512). On a CPU, MLX's exp makes the
# attention softmax over 512+ tokens dominate a step; 32 keeps tests quick.
TINY_T5_LENGTH = 32
SEED = 20261127
DIFFUSERS_VERSION = "0.42.1"

TRANSFORMER_CONFIG = {
    "_class_name": "FluxTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 32,
    "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [4, 6, 6],
}
VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 16, "norm_num_groups": 4, "sample_size": 64,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "latents_mean": None, "latents_std": None,
    "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
}
CLIP_CONFIG = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "torch_dtype": "float32",
    "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
}
T5_CONFIG = {
    "architectures": ["T5EncoderModel"], "model_type": "t5", "torch_dtype": "float32",
    "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.0,
    "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
    "is_gated_act": True, "is_encoder_decoder": True, "tie_word_embeddings": False,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "initializer_factor": 1.0,
}
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}
MODEL_INDEX = {
    "_class_name": "FluxPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def tiny_model_path() -> Path:
    return cache_dir() / TINY_VERSION


def ensure_tiny_model() -> Path:
    """The tiny model's folder, written on first use (atomically: concurrent first uses are safe)."""
    target = tiny_model_path()
    if (target / "model_index.json").is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_VERSION}-", dir=target.parent))
    try:
        write_tiny_model(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first: theirs is identical
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built the tiny model in %s", target)
    return target


def write_tiny_model(folder: Path, transformer_overrides: dict | None = None) -> Path:
    """Write a tiny FLUX model in the diffusers layout into `folder` (deterministic)."""
    from engine.flux import clip, t5, transformer, vae
    from engine.flux.tiny_tokenizers import write_clip_tokenizer, write_t5_tokenizer
    from engine.flux.tokenizers import ClipTokenizer, T5Tokenizer

    folder = Path(folder)
    write_clip_tokenizer(folder / "tokenizer")
    write_t5_tokenizer(folder / "tokenizer_2")
    tokenizer_config = folder / "tokenizer_2" / "tokenizer_config.json"
    _write_json(tokenizer_config, dict(json.loads(tokenizer_config.read_text()), model_max_length=TINY_T5_LENGTH))
    clip_tokenizer = ClipTokenizer.from_folder(folder / "tokenizer")
    t5_tokenizer = T5Tokenizer.from_folder(folder / "tokenizer_2")

    clip_config = dict(CLIP_CONFIG, vocab_size=clip_tokenizer.vocab_size, bos_token_id=clip_tokenizer.bos_id,
                       eos_token_id=clip_tokenizer.eos_id, pad_token_id=clip_tokenizer.pad_id)
    t5_config = dict(T5_CONFIG, vocab_size=t5_tokenizer.vocab_size)
    transformer_config = dict(TRANSFORMER_CONFIG, **(transformer_overrides or {}))
    transformer_config["joint_attention_dim"] = t5_config["d_model"]
    transformer_config["pooled_projection_dim"] = clip_config["hidden_size"]

    mx.random.seed(SEED)
    components = (
        ("transformer", transformer.FluxTransformer, transformer.export_hf_weights, transformer_config,
         "diffusion_pytorch_model.safetensors"),
        ("vae", vae.AutoencoderKL, vae.export_hf_weights, VAE_CONFIG, "diffusion_pytorch_model.safetensors"),
        ("text_encoder", clip.CLIPTextModel, clip.export_hf_weights, clip_config, "model.safetensors"),
        ("text_encoder_2", t5.T5Encoder, t5.export_hf_weights, t5_config, "model.safetensors"),
    )
    for name, build, export, config, filename in components:
        module = build(config)
        weights = export(dict(tree_flatten(module.parameters())))
        (folder / name).mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(folder / name / filename), {k: v.astype(mx.float32) for k, v in weights.items()},
                            metadata={"format": "pt"})
        _write_json(folder / name / "config.json", config)
    _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    _write_json(folder / "model_index.json", MODEL_INDEX)
    return folder


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
