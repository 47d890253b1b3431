"""Text to image with FLUX.1 and any number of LoRA files.

The same function draws the trainer's validation previews, so what the user
sees during training is what `dreambooth-wizard generate` will give.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from engine.errors import OutputError, UserError
from engine.flux import speed
from engine.flux.latents import latent_image_ids, latent_size, pack_latents, text_ids, unpack_latents
from engine.flux.sampler import DEV_SCHEDULER, SCHNELL_SCHEDULER, euler_sample, sampling_sigmas
from engine.paths import atomic_write, output_file, unwritable_reason

log = logging.getLogger(__name__)

# FLUX's VAE shrinks an image 8x and the transformer reads 2x2 latent patches: sides come in 16 px tiles
SIZE_MULTIPLE = 16
MAX_SIDE = 8192  # px; far past what FLUX.1 was trained on, and below sizes whose noise alone fills memory
MAX_STEPS = 1000
MAX_SEED = 2**64 - 1  # mx.random.key takes an unsigned 64-bit seed


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


def request_problems(request: GenerationRequest, multiple: int = SIZE_MULTIPLE) -> list[tuple[str, str]]:
    """What is wrong with `request`'s numbers, as (problem, what to do) pairs; [] when it can be drawn."""
    problems = []
    if not isinstance(request.seed, int) or not 0 <= request.seed <= MAX_SEED:
        problems.append((f"seed = {request.seed} is out of range", f"use a whole number from 0 to {MAX_SEED}, e.g. 42"))
    if not 1 <= request.steps <= MAX_STEPS:
        problems.append((f"steps = {request.steps} is out of range",
                         f"use 1 to {MAX_STEPS} denoising steps; 20 is usual for dev, 4 for schnell"))
    if not math.isfinite(request.guidance) or request.guidance < 0:
        reason = "is below 0" if math.isfinite(request.guidance) else "is not a finite number"
        problems.append((f"guidance = {request.guidance} {reason}", "use 0 or more, e.g. 3.5 (3.0-4.0 suits dev)"))
    for side in ("width", "height"):
        value = getattr(request, side)
        if not multiple <= value <= MAX_SIDE:
            problems.append((f"{side} = {value} px is out of range", f"use {multiple} to {MAX_SIDE} px; 1024 is usual"))
        elif value % multiple:
            lower = value // multiple * multiple
            problems.append((f"{side} = {value} px is not a multiple of {multiple}",
                             f"use {lower} or {lower + multiple} (FLUX draws in {multiple} px tiles)"))
    if request.lora_scales and len(request.lora_scales) != len(request.lora_paths):
        problems.append((f"{len(request.lora_paths)} LoRA file(s) but {len(request.lora_scales)} scale(s)",
                         "give one --lora-scales value per --lora-paths file, or none for 1.0 each"))
    for index, scale in enumerate(request.lora_scales):
        if not math.isfinite(scale):
            problems.append((f"LoRA scale {index + 1} = {scale} is not a number",
                             "use e.g. 1.0 for the LoRA at full strength, 0 to turn it off"))
    return problems


def check_request(request: GenerationRequest, multiple: int = SIZE_MULTIPLE) -> None:
    """Raise a UserError naming every problem `request_problems` finds."""
    problems = request_problems(request, multiple)
    if len(problems) == 1:
        raise UserError(*problems[0])
    if problems:
        lines = "\n".join(f"  - {problem}: {fix}" for problem, fix in problems)
        raise UserError(f"{len(problems)} problems with the image settings:\n{lines}",
                        "change the values named above and run again")


def check_output_file(path: str | Path) -> Path:
    """Raise an OutputError now, before minutes of sampling, if a PNG cannot be written at `path`."""
    target = output_file(path, "image.png", "image file")
    reason = unwritable_reason(target.parent)
    if reason:
        raise OutputError(f"cannot write {target} ({reason})", "choose a folder you can write to")
    return target


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
    from PIL import Image, PngImagePlugin

    path = Path(path)
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, str(value))
    try:
        with atomic_write(path) as temporary:
            Image.fromarray(image).save(temporary, format="PNG", pnginfo=info)
    except OSError as error:
        hint = (f"give a file name, e.g. {path / 'image.png'}" if path.is_dir()
                else "free disk space or choose a folder you can write to")
        raise OutputError(f"cannot write {path} ({error.strerror or error})", hint) from error
    return path


def generate_image(model, request: GenerationRequest, release_text_encoders: bool = False,
                   on_phase=None) -> np.ndarray:
    """One image for `request`, with its LoRA files attached at their scales.

    `release_text_encoders` frees CLIP and T5 once the prompt is encoded (T5-XXL
    alone is ~9 GB in bf16); `on_phase(name)` is called as each phase ends.
    """
    on_phase = on_phase or (lambda name: None)
    check_request(request, 2 * model.vae.scale_factor)
    scales = list(request.lora_scales) or [1.0] * len(request.lora_paths)
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
