"""Flow-matching sigmas and the Euler sampler FLUX.1 uses.

dev shifts its sigmas by the image resolution (more tokens -> later steps stay
noisier); schnell uses them unshifted. The same schedule gives the training
grid that timesteps are drawn from, as mflux does.
"""
from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import numpy as np

# diffusers' FlowMatchEulerDiscreteScheduler defaults for FLUX.1-dev
DEV_SCHEDULER = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                 "base_image_seq_len": 256, "max_image_seq_len": 4096, "shift": 3.0}
SCHNELL_SCHEDULER = {"use_dynamic_shifting": False, "shift": 1.0}


def resolution_shift(image_seq_len: int, scheduler: dict) -> float:
    """mu, linear in the number of image tokens between the base and max lengths."""
    base_len = scheduler.get("base_image_seq_len", 256)
    max_len = scheduler.get("max_image_seq_len", 4096)
    base_shift = scheduler.get("base_shift", 0.5)
    max_shift = scheduler.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def sigma_grid(num_steps: int, image_seq_len: int, scheduler: dict | None = None) -> np.ndarray:
    """`num_steps` sigmas from 1 down to 1/num_steps, shifted as the scheduler says (float64)."""
    scheduler = DEV_SCHEDULER if scheduler is None else scheduler
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
    if scheduler.get("use_dynamic_shifting", False):
        mu = resolution_shift(image_seq_len, scheduler)
        return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    shift = scheduler.get("shift", 1.0)
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sampling_sigmas(num_steps: int, image_seq_len: int, scheduler: dict | None = None) -> np.ndarray:
    """The grid plus the final 0: the sampler steps from each sigma to the next."""
    grid = sigma_grid(num_steps, image_seq_len, scheduler)
    return np.append(grid, 0.0).astype(np.float32)


Denoiser = Callable[[mx.array, mx.array], mx.array]  # (latents, sigma (B,)) -> velocity


def euler_sample(denoise: Denoiser, latents: mx.array, sigmas: np.ndarray,
                 on_step: Callable[[int, mx.array], None] | None = None) -> mx.array:
    """Integrate dx/dsigma = velocity from sigmas[0] to sigmas[-1] with Euler steps."""
    batch = latents.shape[0]
    for index in range(len(sigmas) - 1):
        sigma = mx.full((batch,), float(sigmas[index]), dtype=latents.dtype)
        velocity = denoise(latents, sigma)
        step = float(sigmas[index + 1] - sigmas[index])
        # diffusers' scheduler steps in float32 whatever the model dtype
        latents = (latents.astype(mx.float32) + step * velocity.astype(mx.float32)).astype(latents.dtype)
        mx.eval(latents)
        if on_step is not None:
            on_step(index, latents)
    return latents
