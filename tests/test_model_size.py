"""What a model weighs: parameter counts equal the MLX modules', linears as LoRA names them,
bytes per linear at each quantization."""
from mlx.utils import tree_flatten

from engine.model_size import (
    FLUX1_CLIP,
    FLUX1_DEV_TRANSFORMER,
    FLUX1_T5,
    FLUX1_VAE,
    ModelConfigs,
    linear_bytes,
    model_configs_for,
    text_encoder_parameter_counts,
    transformer_linears,
    transformer_parameter_count,
    vae_parameter_counts,
)

FLUX_VAE_CONFIG = dict(FLUX1_VAE, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def parameter_count(module) -> int:
    return sum(value.size for _, value in tree_flatten(module.parameters()))


def test_flux1_dev_transformer_has_the_published_11_9_billion_parameters():
    count = transformer_parameter_count(FLUX1_DEV_TRANSFORMER)
    assert abs(count - 11.9e9) / 11.9e9 < 0.01


def test_parameter_counts_equal_the_mlx_modules_at_full_size():
    # MLX initialises lazily: building the full-size modules allocates nothing
    from engine.flux.clip import CLIPTextModel
    from engine.flux.t5 import T5Encoder
    from engine.flux.transformer import FluxTransformer
    from engine.flux.vae import AutoencoderKL

    assert transformer_parameter_count(FLUX1_DEV_TRANSFORMER) == parameter_count(FluxTransformer(FLUX1_DEV_TRANSFORMER))
    schnell = dict(FLUX1_DEV_TRANSFORMER, guidance_embeds=False)
    assert transformer_parameter_count(schnell) == parameter_count(FluxTransformer(schnell))
    t5, clip = text_encoder_parameter_counts(ModelConfigs(transformer=FLUX1_DEV_TRANSFORMER))
    assert t5 == parameter_count(T5Encoder(FLUX1_T5))
    assert clip == parameter_count(CLIPTextModel(FLUX1_CLIP))
    vae = AutoencoderKL(FLUX_VAE_CONFIG)
    assert vae_parameter_counts(FLUX_VAE_CONFIG) == (parameter_count(vae.encoder), parameter_count(vae.decoder))


def test_parameter_counts_equal_the_mlx_modules_for_the_tiny_model():
    from engine.flux import tiny
    from engine.flux.transformer import FluxTransformer
    from engine.flux.vae import AutoencoderKL

    configs = model_configs_for("tiny")
    assert transformer_parameter_count(configs.transformer) == parameter_count(FluxTransformer(configs.transformer))
    vae = AutoencoderKL(tiny.VAE_CONFIG)
    assert vae_parameter_counts(tiny.VAE_CONFIG) == (parameter_count(vae.encoder), parameter_count(vae.decoder))


def test_transformer_linears_match_the_modules_lora_can_wrap():
    import mlx.nn as nn

    from engine.flux.transformer import FluxTransformer

    config = model_configs_for("tiny").transformer
    module_linears = {path: (layer.weight.shape[1], layer.weight.shape[0])
                      for path, layer in FluxTransformer(config).named_modules() if isinstance(layer, nn.Linear)}
    assert transformer_linears(config) == module_linears


def test_quantized_linear_costs_its_bits_plus_a_scale_and_bias_per_group():
    unquantized = linear_bytes(3072, 3072, None, 2)
    assert unquantized == (3072 * 3072 + 3072) * 2
    four = linear_bytes(3072, 3072, 4, 2)
    assert four == 3072 * 3072 // 2 + 2 * (3072 * 3072 // 64) * 2 + 3072 * 2
    assert linear_bytes(3072, 3072, 8, 2) > four


def test_linear_whose_width_fits_no_group_stays_unquantized():
    assert linear_bytes(100, 10, 4, 2) == linear_bytes(100, 10, None, 2)
    # a width of 32 (not 64) quantizes with groups of 32
    assert linear_bytes(32, 64, 4, 2) == 32 * 64 // 2 + 2 * (32 * 64 // 32) * 2 + 64 * 2
