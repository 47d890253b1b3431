"""`load_model`: a FLUX.1 model (transformer, VAE, CLIP-L, T5 and tokenizers) from
a name, a Hugging Face repo id or a local folder in the diffusers layout.

Compute is bf16 on a GPU or Apple Silicon and float32 on a plain CPU, where
MLX's bf16 matmuls are a slow loop. Quantization (3/4/5/6/8 bits) applies to
the frozen linears of the transformer and the text encoders.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from engine.config import QUANTIZE_BITS
from engine.errors import ModelLoadError
from engine.flux import speed
from engine.flux.hub import ProgressCallback, resolve_model_path
from engine.flux.weights import load_component
from engine.paths import keep_compiled_gpu_kernels

log = logging.getLogger(__name__)

QUANTIZE_GROUP_SIZE = 64
CLIP_MAX_LENGTH = 77


def default_dtype() -> mx.Dtype:
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


@dataclass
class FluxModel:
    """The loaded model. Text encoders and the VAE encoder can be released once
    their work is done, so training holds only the transformer (and VAE decoder)."""

    name: str
    path: Path
    transformer: nn.Module | None
    vae: nn.Module | None  # None only in describe_model's description
    clip: nn.Module | None
    t5: nn.Module | None
    clip_tokenizer: object | None
    t5_tokenizer: object | None
    dtype: mx.Dtype
    quantize: int | None
    transformer_config: dict
    scheduler_config: dict = field(default_factory=dict)
    tokenizer_max_length: int | None = None  # tokenizer_2's model_max_length

    @property
    def has_guidance(self) -> bool:
        return bool(self.transformer_config.get("guidance_embeds"))

    @property
    def t5_max_length(self) -> int:
        # FLUX.1-dev was trained with 512 T5 tokens, schnell with 256; never pad past what the tokenizer allows
        length = 512 if self.has_guidance else 256
        return min(length, self.tokenizer_max_length) if self.tokenizer_max_length else length

    @property
    def num_joint_blocks(self) -> int:
        return int(self.transformer_config.get("num_layers", 19))

    @property
    def num_single_blocks(self) -> int:
        return int(self.transformer_config.get("num_single_layers", 38))

    def encode_prompts(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        """(T5 hidden states (B, T, D), CLIP pooled output (B, P)) in the compute dtype."""
        if self.clip is None or self.t5 is None:
            raise RuntimeError("the text encoders were released; encode prompts before releasing them")
        clip_ids = mx.array(self.clip_tokenizer.encode(prompts, CLIP_MAX_LENGTH))
        t5_ids = mx.array(self.t5_tokenizer.encode(prompts, self.t5_max_length))
        _, pooled = self.clip(clip_ids)
        hidden = self.t5(t5_ids)
        mx.eval(hidden, pooled)
        return hidden.astype(self.dtype), pooled.astype(self.dtype)

    def load_transformer(self) -> nn.Module:
        """Read (and quantize, tensor by tensor) the transformer, if not loaded yet."""
        from engine.flux.transformer import FluxTransformer, convert_hf_weights

        if self.transformer is None:
            self.transformer, _ = load_component(self.path / "transformer", FluxTransformer, convert_hf_weights,
                                                 self.dtype, self.quantize)
        return self.transformer

    def release_text_encoders(self) -> None:
        self.clip = self.t5 = None
        mx.clear_cache()

    def release_vae_encoder(self) -> None:
        self.vae.release_encoder()
        mx.clear_cache()


def load_model(name_or_path: str | os.PathLike = "tiny", quantize: int | None = None, dtype: mx.Dtype | None = None,
               text_encoders: bool = True, transformer: bool = True, progress: ProgressCallback | None = None,
               token: str | None = None) -> FluxModel:
    """Load FLUX.1: `dev`, `schnell`, `tiny`, a Hugging Face repo id or a local folder.

    `transformer=False` leaves the transformer on disk until `model.load_transformer()`:
    the trainer encodes its images and prompts first and frees the encoders, so
    T5-XXL and the transformer are never in memory together.
    """
    from engine.flux.clip import CLIPTextModel
    from engine.flux.clip import convert_hf_weights as convert_clip
    from engine.flux.t5 import T5Encoder
    from engine.flux.t5 import convert_hf_weights as convert_t5
    from engine.flux.tokenizers import ClipTokenizer, T5Tokenizer
    from engine.flux.vae import AutoencoderKL
    from engine.flux.vae import convert_hf_weights as convert_vae

    model = describe_model(name_or_path, quantize, dtype, progress, token)
    folder, dtype = model.path, model.dtype
    model.vae, _ = load_component(folder / "vae", AutoencoderKL, convert_vae, dtype)
    if text_encoders:
        for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            if not (folder / sub).is_dir():
                raise ModelLoadError(f"{folder} has no {sub}/ folder", "the model folder is incomplete: download it again")
        model.clip, _ = load_component(folder / "text_encoder", CLIPTextModel, convert_clip, dtype, quantize)
        model.t5, _ = load_component(folder / "text_encoder_2", T5Encoder, convert_t5, dtype, quantize)
        model.clip_tokenizer = ClipTokenizer.from_folder(folder / "tokenizer")
        model.t5_tokenizer = T5Tokenizer.from_folder(folder / "tokenizer_2")
    if transformer:
        model.load_transformer()
    return model


def describe_model(name_or_path: str | os.PathLike = "tiny", quantize: int | None = None, dtype: mx.Dtype | None = None,
                   progress: ProgressCallback | None = None, token: str | None = None) -> FluxModel:
    """The model as its folder's configs describe it, nothing loaded (vae, encoders and transformer None):
    what a run can plan with before it loads (engine/kernel_warmup.py)."""
    from engine.flux.weights import read_config

    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise ModelLoadError(f"quantize = {quantize} is not supported", "use 3, 4, 5, 6 or 8 bits, or none")
    if speed.on_cuda():  # before the first kernel compiles (loading quantizes on the GPU), and before a
        keep_compiled_gpu_kernels(mx.__version__)  # kernel warm-up shares the cache (engine/kernel_warmup.py)
    folder = resolve_model_path(name_or_path, progress=progress, token=token)
    tokenizer_config = folder / "tokenizer_2" / "tokenizer_config.json"
    tokenizer_max_length = None
    if tokenizer_config.is_file():
        value = json.loads(tokenizer_config.read_text()).get("model_max_length")
        tokenizer_max_length = int(value) if isinstance(value, (int, float)) and value < 1e9 else None
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_path.read_text()) if scheduler_path.is_file() else {}
    return FluxModel(name=str(name_or_path), path=folder, transformer=None, vae=None, clip=None, t5=None,
                     clip_tokenizer=None, t5_tokenizer=None, dtype=dtype or default_dtype(), quantize=quantize,
                     transformer_config=read_config(folder / "transformer"), scheduler_config=scheduler_config,
                     tokenizer_max_length=tokenizer_max_length)


def quantize_module(module: nn.Module, bits: int, label: str = "model", group_size: int = QUANTIZE_GROUP_SIZE,
                    evaluate: bool = True) -> dict[str, int]:
    """Quantize every linear whose input width fits a group size (64, else 32).

    Returns {layer path: group size} of the quantized linears; the others stay
    in the compute dtype and are counted in a log line. Off Metal the layers
    dequantize just in time for a plain matmul (engine/flux/quantized.py).
    With `evaluate=False` only the structure changes (the loader then fills it).
    """
    from engine.flux.quantized import prefer_dequantizing, use_dequantizing_linears

    skipped, quantized = [], {}

    def fits(path: str, layer: nn.Module):
        if not isinstance(layer, nn.Linear):
            return False
        width = layer.weight.shape[-1]
        for size in (group_size, 32):
            if width % size == 0:
                quantized[path] = size
                return {"group_size": size, "bits": bits, "mode": "affine"}
        skipped.append(path)
        return False

    nn.quantize(module, group_size=group_size, bits=bits, class_predicate=fits)
    if prefer_dequantizing():
        use_dequantizing_linears(module)
    if evaluate:
        mx.eval(module.parameters())
    if skipped:
        log.info("%s: %d linear layer(s) stay unquantized (width not a multiple of 32), e.g. %s",
                 label, len(skipped), skipped[0])
    return quantized
