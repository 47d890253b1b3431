"""VAE latents <-> the transformer's token sequence, and the position ids FLUX uses.

FLUX sees an image as a sequence of 2x2 latent patches. The feature order inside
each patch must be diffusers' (channel, row, column), or LoRAs trained here would
not fit the real model: (B, h, w, C) -> (B, h/2 * w/2, C * 4).
"""
from __future__ import annotations

import mlx.core as mx


def latent_size(height: int, width: int, scale_factor: int) -> tuple[int, int]:
    """Latent (height, width) of an image, which must tile into whole 2x2 latent patches."""
    multiple = 2 * scale_factor
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(
            f"Image size {width}x{height} px does not fit FLUX: width and height must be "
            f"positive multiples of {multiple} px (for example "
            f"{max(multiple, width // multiple * multiple)}x{max(multiple, height // multiple * multiple)})."
        )
    return height // scale_factor, width // scale_factor


def pack_latents(latents: mx.array) -> mx.array:
    """(B, h, w, C) -> (B, h/2 * w/2, C * 4), patch features ordered (C, 2, 2) as diffusers."""
    batch, height, width, channels = latents.shape
    _check_even(height, width)
    x = latents.reshape(batch, height // 2, 2, width // 2, 2, channels)
    x = x.transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(packed: mx.array, height: int, width: int) -> mx.array:
    """Inverse of `pack_latents`; height and width are the latent's, not the image's."""
    batch, tokens, features = packed.shape
    _check_even(height, width)
    if tokens != (height // 2) * (width // 2) or features % 4:
        raise ValueError(f"cannot unpack {tuple(packed.shape)} into {height}x{width} latents")
    channels = features // 4
    x = packed.reshape(batch, height // 2, width // 2, channels, 2, 2)
    x = x.transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(batch, height, width, channels)


def latent_image_ids(height: int, width: int) -> mx.array:
    """(h/2 * w/2, 3) float32 ids (0, patch row, patch column) for latents of height x width."""
    _check_even(height, width)
    rows, columns = height // 2, width // 2
    row_ids = mx.broadcast_to(mx.arange(rows, dtype=mx.float32)[:, None], (rows, columns))
    column_ids = mx.broadcast_to(mx.arange(columns, dtype=mx.float32)[None, :], (rows, columns))
    ids = mx.stack([mx.zeros((rows, columns), dtype=mx.float32), row_ids, column_ids], axis=-1)
    return ids.reshape(rows * columns, 3)


def text_ids(length: int) -> mx.array:
    """Text tokens all sit at position zero."""
    return mx.zeros((length, 3), dtype=mx.float32)


def _check_even(height: int, width: int) -> None:
    if height % 2 or width % 2:
        raise ValueError(f"latent size {height}x{width} must be even to form 2x2 patches")
