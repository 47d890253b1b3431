"""Our MLX AutoencoderKL against diffusers' on tiny FLUX-like configs with random weights."""
import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from engine.errors import ModelLoadError
from engine.flux.vae import AutoencoderKL, convert_hf_weights, export_hf_weights

FLUX_LIKE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.30.0",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
WITH_QUANT_CONVS = {
    **FLUX_LIKE,
    "block_out_channels": [8, 16, 24, 24],
    "layers_per_block": 2,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "shift_factor": None,
    "some_future_key": 1,
}
WITHOUT_ATTENTION = {**FLUX_LIKE, "down_block_types": ["DownEncoderBlock2D"] * 3,
                     "up_block_types": ["UpDecoderBlock2D"] * 3, "block_out_channels": [8, 16, 16],
                     "mid_block_add_attention": False}


def relative_error(ours: mx.array, reference: torch.Tensor) -> float:
    a, b = np.array(ours, dtype=np.float64), reference.detach().double().numpy()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def diffusers_vae(config: dict, seed: int = 0) -> DiffusersAutoencoderKL:
    torch.manual_seed(seed)
    model = DiffusersAutoencoderKL.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # norms near 1 so activations keep their scale through the depth
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            parameter.copy_(base + torch.randn_like(parameter) * 0.2)
    return model


def to_mlx(state_dict: dict) -> dict:
    return {k: mx.array(v.detach().float().numpy()) for k, v in state_dict.items()}


def our_vae(config: dict, reference: DiffusersAutoencoderKL) -> AutoencoderKL:
    model = AutoencoderKL(config)
    model.load_weights(list(convert_hf_weights(to_mlx(reference.state_dict())).items()), strict=True)
    return model


@pytest.mark.parametrize("config", [FLUX_LIKE, WITH_QUANT_CONVS, WITHOUT_ATTENTION],
                         ids=["flux-like", "quant-convs", "no-attention"])
def test_encode_and_decode_match_diffusers(config):
    reference = diffusers_vae(config)
    model = our_vae(config, reference)
    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 48) * 2 - 1  # NCHW, non-square

    with torch.no_grad():
        mean = reference.encode(images).latent_dist.mean
        decoded = reference.decode(mean).sample

    latents = model.encode(mx.array(images.permute(0, 2, 3, 1).numpy()))
    factor = model.scale_factor
    assert latents.shape == (2, 64 // factor, 48 // factor, config["latent_channels"])
    assert relative_error(latents, mean.permute(0, 2, 3, 1)) < 1e-4

    # decode from the reference latents, so decoder errors are measured on their own
    images_back = model.decode(mx.array(mean.permute(0, 2, 3, 1).numpy()))
    assert images_back.shape == (2, 64, 48, 3)
    assert relative_error(images_back, decoded.permute(0, 2, 3, 1)) < 1e-4


def test_parameter_names_are_diffusers_state_dict_keys():
    for config in (FLUX_LIKE, WITH_QUANT_CONVS, WITHOUT_ATTENTION):
        reference = diffusers_vae(config)
        ours = dict(tree_flatten(AutoencoderKL(config).parameters()))
        assert set(ours) == set(reference.state_dict())


def test_weights_round_trip_through_convert_and_export():
    reference = diffusers_vae(WITH_QUANT_CONVS).state_dict()
    exported = export_hf_weights(convert_hf_weights(to_mlx(reference)))
    assert set(exported) == set(reference)
    for key, value in reference.items():
        assert tuple(exported[key].shape) == tuple(value.shape), key
        assert np.array_equal(np.array(exported[key]), value.numpy()), key
    # and diffusers accepts what we export, strictly
    rebuilt = DiffusersAutoencoderKL.from_config(WITH_QUANT_CONVS)
    rebuilt.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True)


def test_convert_accepts_old_conv_shaped_attention_weights():
    reference = to_mlx(diffusers_vae(FLUX_LIKE).state_dict())
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old_style = {}
    for key, value in reference.items():
        if ".attentions." in key:
            for new, old in old_names.items():
                key = key.replace(f".{new}.", f".{old}.")
            if value.ndim == 2:
                value = value[:, :, None, None]  # stored as 1x1 convolutions
        old_style[key] = value
    assert any(".query." in key for key in old_style)

    converted, expected = convert_hf_weights(old_style), convert_hf_weights(reference)
    assert set(converted) == set(expected)
    for key in expected:
        assert converted[key].shape == expected[key].shape, key
        assert mx.array_equal(converted[key], expected[key]), key


def test_normalize_uses_config_factors_and_denormalize_inverts_it():
    z = mx.random.normal((1, 4, 6, 16), key=mx.random.key(0))
    flux = AutoencoderKL(FLUX_LIKE)
    assert mx.allclose(flux.normalize(z), (z - 0.1159) * 0.3611)
    assert mx.allclose(flux.denormalize(flux.normalize(z)), z, atol=1e-5)
    no_shift = AutoencoderKL(WITH_QUANT_CONVS)
    assert mx.allclose(no_shift.normalize(z), z * 0.3611)


def test_scale_factor_follows_the_number_of_blocks():
    assert AutoencoderKL(FLUX_LIKE).scale_factor == 8
    assert AutoencoderKL(WITHOUT_ATTENTION).scale_factor == 4


def test_release_encoder_drops_its_weights_and_keeps_decoding():
    reference = diffusers_vae(WITH_QUANT_CONVS)
    model = our_vae(WITH_QUANT_CONVS, reference)
    latents = model.encode(mx.zeros((1, 32, 32, 3)))
    model.release_encoder()
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert names and not any(k.startswith(("encoder.", "quant_conv.")) for k in names)
    assert any(k.startswith("post_quant_conv.") for k in names)
    assert model.decode(latents).shape == (1, 32, 32, 3)
    with pytest.raises(RuntimeError, match="released"):
        model.encode(mx.zeros((1, 32, 32, 3)))


def test_bfloat16_model_encodes_float32_images_in_bfloat16():
    model = AutoencoderKL(WITHOUT_ATTENTION)
    model.set_dtype(mx.bfloat16)
    latents = model.encode(mx.zeros((1, 16, 16, 3), dtype=mx.float32))
    assert latents.dtype == mx.bfloat16
    assert model.decode(latents.astype(mx.float32)).dtype == mx.bfloat16


def test_unsupported_config_is_a_model_load_error():
    with pytest.raises(ModelLoadError, match="act_fn"):
        AutoencoderKL({**FLUX_LIKE, "act_fn": "gelu"})
    with pytest.raises(ModelLoadError, match="down_block_types"):
        AutoencoderKL({**FLUX_LIKE, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})
