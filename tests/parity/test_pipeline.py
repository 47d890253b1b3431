"""Whole-pipeline parity: our loader + sampler vs diffusers' FluxPipeline on the tiny model."""
from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from engine.flux.loading import load_model
from engine.flux.tiny import ensure_tiny_model, write_tiny_model
from engine.generate import denoise_latents, initial_noise

PROMPT = "photo of sks dog, wearing a hat!"


def relative_error(ours: mx.array, theirs: torch.Tensor) -> float:
    a = np.array(ours.astype(mx.float32))
    b = theirs.detach().float().numpy()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def schnell_like(folder):
    write_tiny_model(folder, transformer_overrides={"guidance_embeds": False})
    scheduler = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    config.update(use_dynamic_shifting=False, shift=1.0)
    scheduler.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("variant,steps,size", [("dev", 3, (64, 48)), ("schnell", 2, (48, 64)), ("dev", 4, (64, 64))])
def test_sampler_reaches_the_same_latents_as_diffusers(tmp_path, variant, steps, size):
    from diffusers import FluxPipeline

    width, height = size
    folder = ensure_tiny_model() if variant == "dev" else schnell_like(tmp_path / "schnell")
    model = load_model(folder)
    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    latent_h, latent_w = height // model.vae.scale_factor, width // model.vae.scale_factor
    noise = initial_noise(11, latent_h, latent_w, 16)

    hidden, pooled = model.encode_prompts([PROMPT])
    ours = denoise_latents(model, hidden, pooled, width, height, steps, guidance=3.5, noise=noise)
    theirs = pipe(PROMPT, width=width, height=height, num_inference_steps=steps, guidance_scale=3.5,
                  latents=torch.from_numpy(np.array(noise)), output_type="latent",
                  max_sequence_length=model.t5_max_length).images
    assert ours.shape == tuple(theirs.shape)
    assert relative_error(ours, theirs) < 1e-4


def test_prompt_encoding_matches_diffusers(tmp_path):
    from diffusers import FluxPipeline

    folder = ensure_tiny_model()
    model = load_model(folder)
    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    for prompt in ["", PROMPT, "über café 東京 " * 40]:
        hidden, pooled = model.encode_prompts([prompt])
        their_hidden, their_pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=model.t5_max_length)
        assert relative_error(hidden, their_hidden) < 1e-4
        assert relative_error(pooled, their_pooled) < 1e-4


def test_decoded_image_matches_diffusers_vae(tmp_path):
    from diffusers import FluxPipeline

    from engine.generate import decode_latents

    folder = ensure_tiny_model()
    model = load_model(folder)
    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    packed = initial_noise(5, 8, 6, 16)
    ours = decode_latents(model, packed, width=48, height=64)[0]
    latents = pipe._unpack_latents(torch.from_numpy(np.array(packed)), 64, 48, pipe.vae_scale_factor).detach()
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents).sample
    theirs = ((image / 2 + 0.5).clamp(0, 1) * 255).round()[0].permute(1, 2, 0).detach().numpy()
    assert np.abs(ours.astype(np.float32) - theirs).max() <= 1.0
