"""CLIP-L text model and T5 encoder against transformers, tiny random configs, float32."""
import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from engine.flux import clip, t5

TOLERANCE = 1e-4


def relative_error(ours: mx.array, reference: torch.Tensor) -> float:
    reference = reference.detach().numpy()
    return float(np.linalg.norm(np.array(ours) - reference) / np.linalg.norm(reference))


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, so no zero bias or unit norm hides a mistake.

    Norm scales stay near 1 so activations reach the range where, say, erf
    GELU and its tanh approximation differ by more than the tolerance.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * 0.2
            parameter.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)
    return model.eval()


def to_mlx(state_dict: dict) -> dict[str, mx.array]:
    return {name: mx.array(tensor.detach().numpy()) for name, tensor in state_dict.items()}


def token_ids(vocab_size: int, batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=(batch, length)).astype(np.int64)


CLIP_CONFIG = dict(
    vocab_size=99, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
    bos_token_id=97, pad_token_id=98,
)


def clip_pair(eos_token_id: int, folder=None, seed: int = 0):
    """With a folder, weights travel through a file transformers saved, else its state_dict."""
    config = dict(CLIP_CONFIG, eos_token_id=eos_token_id)
    reference = randomised(CLIPTextModel(CLIPTextConfig(**config)), seed)
    if folder is None:
        weights = to_mlx(reference.state_dict())
    else:
        reference.save_pretrained(folder)
        weights = mx.load(str(folder / "model.safetensors"))
    ours = clip.CLIPTextModel(dict(config, _name_or_path="unknown keys are ignored"))
    ours.load_weights(list(clip.convert_hf_weights(weights).items()), strict=True)
    return reference, ours


def clip_prompts(eos_token_id: int) -> np.ndarray:
    """Like FLUX's CLIP input: bos, words, eos, then padding with the eos id."""
    ids = token_ids(90, 3, 77, seed=1)
    ids[:, 0] = 97
    for row, length in enumerate([5, 20, 76]):
        ids[row, length:] = 98
        ids[row, length] = eos_token_id if eos_token_id != 2 else 98
    return ids


@pytest.mark.parametrize("eos_token_id", [2, 49], ids=["legacy-eos-2", "real-eos"])
def test_clip_text_model_matches_transformers(eos_token_id, tmp_path):
    reference, ours = clip_pair(eos_token_id, folder=tmp_path if eos_token_id == 2 else None)
    ids = clip_prompts(eos_token_id)
    if eos_token_id != 2:
        ids[0, 40] = eos_token_id  # a second eos: pooling must take the first
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids))
    hidden, pooled = ours(mx.array(ids.astype(np.int32)))
    assert hidden.shape == (3, 77, 48) and pooled.shape == (3, 48)
    assert relative_error(hidden, expected.last_hidden_state) < TOLERANCE
    assert relative_error(pooled, expected.pooler_output) < TOLERANCE


def test_clip_pools_at_first_maximum_in_legacy_mode():
    _, ours = clip_pair(eos_token_id=2)
    ids = mx.array([[97, 5, 98, 98, 98]], dtype=mx.int32)
    hidden, pooled = ours(ids)
    assert np.allclose(np.array(pooled[0]), np.array(hidden[0, 2]))


def test_clip_is_causal_so_padding_does_not_change_earlier_tokens():
    _, ours = clip_pair(eos_token_id=2)
    short = mx.array([[97, 5, 6, 98, 98]], dtype=mx.int32)
    changed = mx.array([[97, 5, 6, 98, 7]], dtype=mx.int32)
    assert np.allclose(np.array(ours(short)[0][0, :4]), np.array(ours(changed)[0][0, :4]), atol=1e-6)


def test_clip_weights_round_trip_through_transformers(tmp_path):
    reference, ours = clip_pair(eos_token_id=49)
    exported = clip.export_hf_weights(dict(tree_flatten(ours.parameters())))
    save_file({name: np.array(value) for name, value in exported.items()}, str(tmp_path / "model.safetensors"))
    reference.config.save_pretrained(tmp_path)
    loaded, info = CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.from_numpy(clip_prompts(49))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).pooler_output, reference(ids).pooler_output)


T5_CONFIG = dict(
    vocab_size=120, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_heads=4,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
)


def t5_pair(feed_forward_proj: str, names: str, seed: int = 0):
    config = dict(T5_CONFIG, feed_forward_proj=feed_forward_proj)
    reference = randomised(T5EncoderModel(T5Config(**config)), seed)
    state = reference.state_dict()
    if names == "shared-only":
        state.pop(t5.TIED_EMBEDDING)
    elif names == "tied-only":
        state.pop(t5.SHARED_EMBEDDING)
    ours = t5.T5Encoder(dict(config, architectures=["T5EncoderModel"]))
    ours.load_weights(list(t5.convert_hf_weights(to_mlx(state)).items()), strict=True)
    return reference, ours


@pytest.mark.parametrize(
    "feed_forward_proj, names, length",
    [("gated-gelu", "both", 300), ("gated-gelu", "shared-only", 40), ("relu", "tied-only", 64)],
)
def test_t5_encoder_matches_transformers(feed_forward_proj, names, length):
    reference, ours = t5_pair(feed_forward_proj, names)
    ids = token_ids(120, 2, length, seed=2)
    ids[0, length // 2:] = 0  # padding is attended, as FLUX passes no mask
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).last_hidden_state
    hidden = ours(mx.array(ids.astype(np.int32)))
    assert hidden.shape == (2, length, 64)
    assert relative_error(hidden, expected) < TOLERANCE


@pytest.mark.parametrize("buckets, distance", [(32, 128), (16, 20), (8, 64)])
def test_t5_relative_position_buckets_match_transformers(buckets, distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    length = 600
    positions = torch.arange(length)
    relative = positions[None, :] - positions[:, None]
    expected = T5Attention._relative_position_bucket(relative, True, buckets, distance).numpy()
    assert np.array_equal(t5.relative_position_buckets(length, buckets, distance), expected)


def test_t5_weights_round_trip_through_transformers(tmp_path):
    reference, ours = t5_pair("gated-gelu", "both")
    exported = t5.export_hf_weights(dict(tree_flatten(ours.parameters())))
    assert set(exported) == set(reference.state_dict())
    save_file({name: np.array(value) for name, value in exported.items()}, str(tmp_path / "model.safetensors"))
    reference.config.save_pretrained(tmp_path)
    loaded, info = T5EncoderModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.from_numpy(token_ids(120, 1, 16, seed=3))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).last_hidden_state, reference(ids).last_hidden_state)


def test_t5_in_bfloat16_stays_finite_and_close_with_huge_activations():
    """Real T5-XXL's residual stream reaches values past float16's range; bfloat16 must cope."""
    from mlx.utils import tree_map

    reference, ours = t5_pair("gated-gelu", "both")
    with torch.no_grad():
        reference.shared.weight.mul_(1e5)
    ours.shared.weight = ours.shared.weight * 1e5
    ours.update(tree_map(lambda p: p.astype(mx.bfloat16), ours.parameters()))
    ids = token_ids(120, 2, 64, seed=4)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).last_hidden_state
    hidden = ours(mx.array(ids.astype(np.int32)))
    assert hidden.dtype == mx.bfloat16 and bool(mx.isfinite(hidden).all())
    assert relative_error(hidden.astype(mx.float32), expected) < 2e-2
