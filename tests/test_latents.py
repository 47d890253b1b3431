"""Latent packing and position ids must match diffusers' FluxPipeline element for element."""
import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

from engine.flux.latents import latent_image_ids, latent_size, pack_latents, text_ids, unpack_latents

# latent sizes: non-square, and one with an odd number of patches per side
SIZES = [(8, 6), (6, 10), (4, 4)]


@pytest.mark.parametrize("height,width", SIZES)
def test_pack_latents_matches_diffusers(height, width):
    torch.manual_seed(0)
    nchw = torch.randn(2, 16, height, width)
    expected = FluxPipeline._pack_latents(nchw, 2, 16, height, width)

    packed = pack_latents(mx.array(nchw.permute(0, 2, 3, 1).numpy()))
    assert packed.shape == tuple(expected.shape) == (2, (height // 2) * (width // 2), 64)
    assert np.array_equal(np.array(packed), expected.numpy())


@pytest.mark.parametrize("height,width", SIZES)
def test_unpack_latents_matches_diffusers(height, width):
    torch.manual_seed(1)
    packed = torch.randn(2, (height // 2) * (width // 2), 64)
    scale = 8  # diffusers takes the image size and the VAE factor
    expected = FluxPipeline._unpack_latents(packed, height * scale, width * scale, scale)

    ours = unpack_latents(mx.array(packed.numpy()), height, width)
    assert ours.shape == (2, height, width, 16)
    assert np.array_equal(np.array(ours), expected.permute(0, 2, 3, 1).numpy())


def test_unpack_inverts_pack():
    z = mx.random.normal((3, 10, 6, 16), key=mx.random.key(2))
    assert mx.array_equal(unpack_latents(pack_latents(z), 10, 6), z)


def test_unpack_rejects_a_size_that_does_not_fit():
    with pytest.raises(ValueError, match="cannot unpack"):
        unpack_latents(mx.zeros((1, 12, 64)), 8, 8)


@pytest.mark.parametrize("height,width", SIZES)
def test_latent_image_ids_match_diffusers(height, width):
    expected = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, "cpu", torch.float32)
    ids = latent_image_ids(height, width)
    assert ids.dtype == mx.float32
    assert ids.shape == tuple(expected.shape)
    assert np.array_equal(np.array(ids), expected.numpy())


def test_text_ids_are_zeros():
    ids = text_ids(7)
    assert ids.shape == (7, 3) and ids.dtype == mx.float32
    assert not mx.any(ids).item()


def test_latent_size_divides_by_the_vae_factor():
    assert latent_size(1024, 768, 8) == (128, 96)
    assert latent_size(48, 64, 8) == (6, 8)


@pytest.mark.parametrize("height,width", [(1000, 1024), (1024, 520), (0, 512), (8, 8)])
def test_latent_size_rejects_sizes_that_are_not_multiples_of_16(height, width):
    with pytest.raises(ValueError, match="multiples of 16"):
        latent_size(height, width, 8)
