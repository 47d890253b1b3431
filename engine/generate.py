"""Text to image with FLUX.1 and any number of LoRA files.

The same function draws the trainer's validation previews, so what the user
sees during training is what `dreambooth-wizard generate` will give.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from engine.flux import speed
from engine.flux.latents import latent_image_ids, latent_size, pack_latents, text_ids, unpack_latents
from engine.flux.sampler import DEV_SCHEDULER, SCHNELL_SCHEDULER, euler_sample, sampling_sigmas

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    prompt: str
    seed: int = 42
    steps: int = 20
    guidance: float = 3.5
    width: int = 512
    height: int = 512
    lora_paths: list[str] = field(default_factory=list)
    lora_scales: list[float] = field(default_factory=list)


def initial_noise(seed: int, latent_height: int, latent_width: int, channels: int, dtype=mx.float32) -> mx.array:
    """Packed starting noise (1, tokens, channels*4), drawn in NHWC from `seed`."""
    noise = mx.random.normal((1, latent_height, latent_width, channels), key=mx.random.key(seed))
    return pack_latents(noise).astype(dtype)


def scheduler_for(model) -> dict:
    if model.scheduler_config:
        return model.scheduler_config
    return DEV_SCHEDULER if model.has_guidance else SCHNELL_SCHEDULER


def denoise_latents(model, prompt_embeds: mx.array, pooled: mx.array, width: int, height: int, steps: int,
                    guidance: float, seed: int = 0, noise: mx.array | None = None, on_step=None) -> mx.array:
    """Run the sampler from seeded (or given packed) noise; returns packed latents."""
    scale = model.vae.scale_factor
    latent_h, latent_w = latent_size(height, width, scale)
    channels = model.transformer_config["in_channels"] // 4
    if noise is None:
        noise = initial_noise(seed, latent_h, latent_w, channels)
    latents = noise.astype(model.dtype)
    batch = latents.shape[0]
    img_ids = latent_image_ids(latent_h, latent_w)
    txt_ids = text_ids(prompt_embeds.shape[1])
    guidance_vector = mx.full((batch,), guidance, dtype=model.dtype) if model.has_guidance else None
    sigmas = sampling_sigmas(steps, img_ids.shape[0], scheduler_for(model))

    def velocity(x, sigma):
        # block by block: a call queued whole holds every block's temporaries (engine/flux/bounded_queue.py)
        return model.transformer(x, prompt_embeds, pooled, sigma, img_ids, txt_ids, guidance_vector,
                                 depth=speed.INFERENCE_DEPTH)

    return euler_sample(velocity, latents, sigmas, on_step=on_step)


def decode_latents(model, packed: mx.array, width: int, height: int) -> list[np.ndarray]:
    """Packed latents -> uint8 RGB images (H, W, 3)."""
    latent_h, latent_w = latent_size(height, width, model.vae.scale_factor)
    latents = model.vae.denormalize(unpack_latents(packed, latent_h, latent_w))
    images = model.vae.decode(latents.astype(model.dtype), depth=speed.INFERENCE_DEPTH).astype(mx.float32)
    images = mx.clip(images / 2 + 0.5, 0.0, 1.0)
    return [np.array((image * 255).round().astype(mx.uint8)) for image in images]


def save_png(image: np.ndarray, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a PNG atomically (temp file + rename), with text metadata."""
    import os
    import tempfile

    from PIL import Image, PngImagePlugin

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, str(value))
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        Image.fromarray(image).save(temporary, format="PNG", pnginfo=info)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def generate_image(model, request: GenerationRequest, release_text_encoders: bool = False,
                   on_phase=None) -> np.ndarray:
    """One image for `request`, with its LoRA files attached at their scales.

    `release_text_encoders` frees CLIP and T5 once the prompt is encoded (T5-XXL
    alone is ~9 GB in bf16); `on_phase(name)` is called as each phase ends.
    """
    on_phase = on_phase or (lambda name: None)
    scales = list(request.lora_scales) or [1.0] * len(request.lora_paths)
    if len(scales) != len(request.lora_paths):
        from engine.errors import UserError

        raise UserError(f"{len(request.lora_paths)} LoRA file(s) but {len(scales)} scale(s)",
                        "give one --lora-scales value per --lora-paths file, or none for 1.0 each")
    prompt_embeds, pooled = model.encode_prompts([request.prompt])
    if release_text_encoders:
        model.release_text_encoders()
    on_phase("encode")
    model.load_transformer()
    if request.lora_paths:
        from engine.lora_formats import attach_lora_files

        attach_lora_files(model.transformer, list(zip(request.lora_paths, scales)))
    on_phase("load transformer")
    latents = denoise_latents(model, prompt_embeds, pooled, request.width, request.height, request.steps,
                              request.guidance, seed=request.seed)
    on_phase("denoise")
    image = decode_latents(model, latents, request.width, request.height)[0]
    on_phase("decode")
    return image
