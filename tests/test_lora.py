"""LoRA layers and LoRA files, on a tiny module tree named like diffusers' FLUX."""
import logging
import os

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from safetensors.numpy import save_file

from engine.errors import LoraFormatError, UserError
from engine.lora import (
    LoraDelta,
    LoRALinear,
    apply_lora,
    fuse_lora,
    get_module,
    load_lora_parameters,
    lora_deltas,
    lora_parameters,
    remove_lora,
)
from engine.lora_formats import (
    attach_lora_files,
    load_lora_file,
    save_diffusers,
    save_kohya,
    save_mflux,
)

DIM, MLP = 8, 32  # FLUX's ratio: the MLP is 4x wider


class Holder(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


def feed_forward(dim):
    return Holder(net=[Holder(proj=nn.Linear(dim, MLP)), nn.Dropout(0.0), nn.Linear(MLP, dim)])


def joint_block():
    attn = Holder(**{n: nn.Linear(DIM, DIM) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                        "add_v_proj", "to_add_out")})
    attn.to_out = [nn.Linear(DIM, DIM), nn.Dropout(0.0)]
    return Holder(attn=attn, ff=feed_forward(DIM), ff_context=feed_forward(DIM),
                  norm1=Holder(linear=nn.Linear(DIM, 6 * DIM)), norm1_context=Holder(linear=nn.Linear(DIM, 6 * DIM)))


def single_block():
    attn = Holder(**{n: nn.Linear(DIM, DIM) for n in ("to_q", "to_k", "to_v")}, norm_q=nn.RMSNorm(DIM))
    return Holder(attn=attn, proj_mlp=nn.Linear(DIM, MLP), proj_out=nn.Linear(DIM + MLP, DIM),
                  norm=Holder(linear=nn.Linear(DIM, 3 * DIM)))


def tiny_flux(seed=0):
    mx.random.seed(seed)
    return Holder(transformer_blocks=[joint_block(), joint_block()], single_transformer_blocks=[single_block()] * 1,
                  x_embedder=nn.Linear(16, DIM), norm_out=Holder(linear=nn.Linear(DIM, 2 * DIM)),
                  proj_out=nn.Linear(DIM, 16))


def x_for(layer, seed=1):
    return mx.random.normal((3, layer.input_dims if isinstance(layer, LoRALinear) else layer.weight.shape[1]),
                            key=mx.random.key(seed))


def randomize(model, seed=3):
    """Non-zero B everywhere (and a fresh A), so deltas are not trivially zero."""
    key = mx.random.key(seed)
    for path in lora_deltas(model):
        key, a, b = mx.random.split(key, 3)
        layer = get_module(model, path)
        layer.set_weights(mx.random.normal(layer.lora_A.shape, key=a), mx.random.normal(layer.lora_B.shape, key=b))


def product(deltas):
    return sum(np.array(d.scale * (d.lora_B @ d.lora_A)) for d in deltas)


TARGETS = [("transformer_blocks.0.attn.to_q", 2), ("transformer_blocks.0.attn.to_v", 3),
           ("transformer_blocks.1.attn.to_out.0", 2), ("transformer_blocks.1.ff.net.0.proj", 4),
           ("transformer_blocks.1.ff_context.net.2", 2), ("transformer_blocks.0.norm1.linear", 2),
           ("transformer_blocks.0.attn.add_k_proj", 2),
           ("single_transformer_blocks.0.attn.to_q", 2), ("single_transformer_blocks.0.proj_mlp", 3),
           ("single_transformer_blocks.0.proj_out", 2), ("single_transformer_blocks.0.norm.linear", 1)]


# ---------------------------------------------------------------- layers


def test_fresh_adapter_leaves_every_output_exactly_unchanged():
    model = tiny_flux()
    bases = {path: get_module(model, path) for path, _ in TARGETS}
    wrapped = apply_lora(model, TARGETS, key=mx.random.key(7))
    assert wrapped == [p for p, _ in TARGETS]
    for path, rank in TARGETS:
        layer = get_module(model, path)
        assert isinstance(layer, LoRALinear) and layer.base is bases[path]
        out_dims, in_dims = bases[path].weight.shape
        assert layer.lora_A.shape == (rank, in_dims) and layer.lora_B.shape == (out_dims, rank)
        assert layer.lora_A.dtype == mx.float32 and not mx.any(layer.lora_B).item()
        assert mx.max(mx.abs(layer.lora_A)).item() <= 1 / np.sqrt(in_dims)
        x = x_for(layer)
        assert mx.array_equal(layer(x), bases[path](x))


def test_initialisation_follows_the_key():
    first, second, other = tiny_flux(), tiny_flux(), tiny_flux()
    apply_lora(first, TARGETS, key=mx.random.key(1))
    apply_lora(second, TARGETS, key=mx.random.key(1))
    apply_lora(other, TARGETS, key=mx.random.key(2))
    path = TARGETS[0][0]
    assert mx.array_equal(get_module(first, path).lora_A, get_module(second, path).lora_A)
    assert not mx.array_equal(get_module(first, path).lora_A, get_module(other, path).lora_A)
    assert not mx.array_equal(get_module(first, path).lora_A, get_module(first, TARGETS[1][0]).lora_A[:2])


def test_only_adapters_are_trainable():
    model = tiny_flux()
    apply_lora(model, TARGETS, key=mx.random.key(0))
    trainable = {k for k, _ in mlx_flatten(model.trainable_parameters())}
    assert trainable == {f"{p}.lora_{w}" for p, _ in TARGETS for w in "AB"}


def mlx_flatten(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


@pytest.mark.parametrize("path", ["transformer_blocks.5.attn.to_q", "transformer_blocks.0.attn.to_x",
                                  "transformer_blocks.0.norm1", "single_transformer_blocks.0.attn.norm_q"])
def test_apply_lora_rejects_targets_that_are_not_linear_layers(path):
    model = tiny_flux()
    with pytest.raises(UserError, match=path.replace(".", r"\.")):
        apply_lora(model, [TARGETS[0], (path, 2)], key=mx.random.key(0))
    assert not isinstance(get_module(model, TARGETS[0][0]), LoRALinear)  # nothing half-applied


def test_apply_lora_rejects_bad_ranks_and_duplicates():
    with pytest.raises(UserError, match="rank"):
        apply_lora(tiny_flux(), [(TARGETS[0][0], 0)], key=mx.random.key(0))
    with pytest.raises(UserError, match="twice"):
        apply_lora(tiny_flux(), [TARGETS[0], TARGETS[0]], key=mx.random.key(0))


def test_output_is_base_plus_scaled_low_rank_product():
    base = nn.Linear(DIM, 5)
    layer = LoRALinear(base, rank=3, key=mx.random.key(0), scale=0.5)
    A, B = mx.random.normal((3, DIM)), mx.random.normal((5, 3))
    layer.set_weights(A, B)
    x = mx.random.normal((4, DIM))
    expected = base(x) + 0.5 * ((x @ A.T) @ B.T)
    assert mx.allclose(layer(x), expected, rtol=1e-6, atol=1e-6)
    base.set_dtype(mx.bfloat16)
    assert layer(x.astype(mx.bfloat16)).dtype == mx.bfloat16  # the delta does not widen the stream
    assert layer.lora_A.dtype == mx.float32


def test_adapter_on_a_quantized_base():
    base = nn.QuantizedLinear(64, 32, bias=True, group_size=32, bits=4)
    layer = LoRALinear(base, rank=2, key=mx.random.key(0))
    assert (layer.input_dims, layer.output_dims) == (64, 32)
    x = mx.random.normal((2, 64))
    assert mx.array_equal(layer(x), base(x))


def test_set_weights_rejects_shapes_that_do_not_fit():
    layer = LoRALinear(nn.Linear(DIM, 5), rank=2, key=mx.random.key(0))
    with pytest.raises(LoraFormatError):
        layer.set_weights(mx.zeros((2, DIM + 1)), mx.zeros((5, 2)))
    with pytest.raises(LoraFormatError):
        layer.set_weights(mx.zeros((2, DIM)), mx.zeros((5, 3)))


def test_parameters_round_trip_into_a_fresh_model():
    model = tiny_flux()
    apply_lora(model, TARGETS, key=mx.random.key(0))
    randomize(model)
    saved = lora_parameters(model)
    assert set(saved) == {f"{p}.lora_{w}" for p, _ in TARGETS for w in "AB"}
    fresh = tiny_flux()
    apply_lora(fresh, TARGETS, key=mx.random.key(9))
    load_lora_parameters(fresh, saved)
    for name, value in lora_parameters(fresh).items():
        assert mx.array_equal(value, saved[name])
    with pytest.raises(LoraFormatError, match="missing"):
        load_lora_parameters(fresh, {k: v for k, v in saved.items() if "proj_mlp" not in k})
    wrong = dict(saved, **{f"{TARGETS[0][0]}.lora_A": mx.zeros((5, DIM))})
    with pytest.raises(LoraFormatError, match="shape"):
        load_lora_parameters(fresh, wrong)


def test_fuse_merges_into_plain_linears_and_keeps_quantized_bases_unless_asked():
    model = tiny_flux()
    apply_lora(model, TARGETS, key=mx.random.key(0))
    randomize(model)
    quantized_path = "proj_out"
    model.proj_out = LoRALinear(nn.QuantizedLinear(64, 16, group_size=32, bits=8), 2, key=mx.random.key(1))
    model.proj_out.set_weights(mx.random.normal((2, 64)), mx.random.normal((16, 2)))
    expected = {p: get_module(model, p)(x_for(get_module(model, p))) for p, _ in TARGETS + [(quantized_path, 0)]}
    fused = fuse_lora(model)
    assert fused == sorted(p for p, _ in TARGETS)
    for path, _ in TARGETS:
        layer = get_module(model, path)
        assert type(layer) is nn.Linear
        assert mx.allclose(layer(x_for(layer)), expected[path], rtol=1e-5, atol=1e-5)
    assert isinstance(model.proj_out, LoRALinear)
    assert fuse_lora(model, dequantize=True) == [quantized_path]
    assert type(model.proj_out) is nn.Linear
    assert mx.allclose(model.proj_out(x_for(model.proj_out)), expected[quantized_path], rtol=1e-5, atol=1e-5)


def test_remove_lora_restores_the_original_layers():
    model = tiny_flux()
    bases = {path: get_module(model, path) for path, _ in TARGETS}
    apply_lora(model, TARGETS, key=mx.random.key(0))
    assert remove_lora(model) == sorted(bases)
    assert all(get_module(model, p) is layer for p, layer in bases.items())
    assert lora_parameters(model) == {}


# ---------------------------------------------------------------- files


def trained_model(seed=3):
    model = tiny_flux()
    apply_lora(model, TARGETS, key=mx.random.key(0))
    randomize(model, seed)
    return model


def assert_same_adapters(loaded, model):
    expected = lora_deltas(model)
    assert set(loaded.adapters) == set(expected)
    for path, deltas in expected.items():
        (A, B, scale), = loaded.adapters[path]
        assert scale == 1.0
        assert np.array_equal(np.array(A), np.array(deltas[0].lora_A)), path
        assert np.array_equal(np.array(B), np.array(deltas[0].lora_B)), path


@pytest.mark.parametrize("save, expected_format", [(save_mflux, "mflux"), (save_diffusers, "diffusers"),
                                                   (save_kohya, "kohya")])
def test_each_format_round_trips_exactly(tmp_path, save, expected_format):
    model = trained_model()
    path = str(tmp_path / "adapter.safetensors")
    save(path, model, {"trigger_word": "sks dog", "base_model": "dev", "lora_format": "from another file"})
    loaded = load_lora_file(path, tiny_flux())
    assert loaded.format == expected_format and loaded.unmatched_keys == []
    assert loaded.metadata["trigger_word"] == "sks dog" and loaded.metadata["lora_format"] == expected_format
    assert_same_adapters(loaded, model)
    assert os.listdir(tmp_path) == ["adapter.safetensors"]  # no temporary file left behind


def test_files_can_be_written_from_flat_parameters(tmp_path):
    model = trained_model()
    path = str(tmp_path / "a.safetensors")
    save_diffusers(path, lora_parameters(model))
    assert_same_adapters(load_lora_file(path, tiny_flux()), model)


def test_file_keys_follow_each_tool(tmp_path):
    import safetensors

    model = trained_model()
    names = {}
    for save in (save_mflux, save_diffusers, save_kohya):
        save(str(tmp_path / save.__name__), model)
        with safetensors.safe_open(str(tmp_path / save.__name__), "np") as f:
            names[save.__name__] = set(f.keys())
            if save is save_mflux:
                assert f.metadata()["mflux_version"] and "transformer_blocks" in f.metadata()
    assert "transformer.transformer_blocks.1.ff.linear1.lora_A" in names["save_mflux"]
    assert "transformer.transformer_blocks.1.attn.to_out.0.lora_B" in names["save_mflux"]
    assert "transformer.transformer_blocks.1.ff.net.0.proj.lora_A.weight" in names["save_diffusers"]
    kohya = names["save_kohya"]
    assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_double_blocks_0_txt_attn_qkv.alpha",
            "lora_unet_single_blocks_0_linear1.lora_up.weight", "lora_unet_single_blocks_0_linear2.alpha",
            "lora_unet_single_blocks_0_modulation_lin.lora_down.weight", "lora_unet_double_blocks_1_img_attn_proj.alpha",
            "lora_unet_double_blocks_1_img_mlp_0.lora_up.weight", "lora_unet_double_blocks_1_txt_mlp_2.alpha",
            "lora_unet_double_blocks_0_img_mod_lin.alpha"} <= kohya


def test_kohya_stacks_fused_layers_exactly_with_zero_blocks_for_untrained_parts(tmp_path):
    model = trained_model()
    path = str(tmp_path / "k.safetensors")
    save_kohya(path, model)
    tensors = mx.load(path)
    down = np.array(tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"])
    up = np.array(tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"])
    assert down.shape == (2 + 3, DIM) and up.shape == (3 * DIM + MLP, 5)
    assert float(tensors["lora_unet_single_blocks_0_linear1.alpha"]) == 5.0
    deltas = lora_deltas(model)
    fused = up @ down
    assert np.array_equal(fused[:DIM], product(deltas["single_transformer_blocks.0.attn.to_q"]))
    assert not fused[DIM:3 * DIM].any()  # k and v were not trained
    np.testing.assert_allclose(fused[3 * DIM:], product(deltas["single_transformer_blocks.0.proj_mlp"]), rtol=1e-6)


def write(path, tensors, metadata=None):
    save_file({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path), metadata)
    return str(path)


def test_kohya_bfl_file_splits_into_our_layers_exactly(tmp_path):
    rng = np.random.default_rng(0)
    down1, up1 = rng.normal(size=(4, DIM)), rng.normal(size=(3 * DIM + MLP, 4))
    down2, up2 = rng.normal(size=(2, DIM)), rng.normal(size=(3 * DIM, 2))
    down3, up3 = rng.normal(size=(2, DIM)), rng.normal(size=(2 * DIM, 2))
    path = write(tmp_path / "bfl.safetensors", {
        "lora_unet_single_blocks_0_linear1.lora_down.weight": down1,
        "lora_unet_single_blocks_0_linear1.lora_up.weight": up1,
        "lora_unet_single_blocks_0_linear1.alpha": np.array(2.0),
        "lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight": down2,
        "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight": up2,
        "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": down3,
        "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": up3,
    })
    loaded = load_lora_file(path, tiny_flux())
    assert loaded.format == "kohya" and loaded.naming == "bfl"
    up1, up2, down1, down2 = (a.astype(np.float32) for a in (up1, up2, down1, down2))
    rows = {"attn.to_q": up1[:DIM], "attn.to_k": up1[DIM:2 * DIM], "attn.to_v": up1[2 * DIM:3 * DIM],
            "proj_mlp": up1[3 * DIM:]}
    for layer, part_up in rows.items():
        (A, B, scale), = loaded.adapters[f"single_transformer_blocks.0.{layer}"]
        assert scale == 0.5 and np.array_equal(np.array(A), down1) and np.array_equal(np.array(B), part_up)
    for index, layer in enumerate(["add_q_proj", "add_k_proj", "add_v_proj"]):
        (A, B, scale), = loaded.adapters[f"transformer_blocks.1.attn.{layer}"]
        assert scale == 1.0 and np.array_equal(np.array(B), up2[index * DIM:(index + 1) * DIM])
    (A, B, _), = loaded.adapters["norm_out.linear"]  # BFL (shift, scale) -> diffusers (scale, shift)
    assert np.array_equal(np.array(B), np.concatenate([up3[DIM:], up3[:DIM]]).astype(np.float32))


def test_peft_variants_and_alpha_are_understood(tmp_path):
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(4, DIM)), rng.normal(size=(DIM, 4))
    variants = {
        "transformer.transformer_blocks.0.attn.to_k": "diffusers",
        "transformer_blocks.0.attn.to_k": "diffusers",
        "base_model.model.transformer_blocks.0.attn.to_k": "diffusers",
    }
    for index, (stem, expected) in enumerate(variants.items()):
        path = write(tmp_path / f"{index}.safetensors", {f"{stem}.lora_A.weight": A, f"{stem}.lora_B.weight": B,
                                                          f"{stem}.alpha": np.array(8.0)})
        loaded = load_lora_file(path, tiny_flux())
        assert loaded.format == expected
        (a, _, scale), = loaded.adapters["transformer_blocks.0.attn.to_k"]
        assert scale == 2.0 and np.array_equal(np.array(a), A.astype(np.float32))


def test_peft_config_in_metadata_sets_the_scale(tmp_path):
    import json

    rng = np.random.default_rng(1)
    stem = "transformer.transformer_blocks.0.attn.to_k"
    config = json.dumps({"transformer.r": 4, "transformer.lora_alpha": 2, "transformer.alpha_pattern": {}})
    path = write(tmp_path / "p.safetensors", {f"{stem}.lora_A.weight": rng.normal(size=(4, DIM)),
                                              f"{stem}.lora_B.weight": rng.normal(size=(DIM, 4))},
                 {"lora_adapter_metadata": config})
    (_, _, scale), = load_lora_file(path, tiny_flux()).adapters["transformer_blocks.0.attn.to_k"]
    assert scale == 0.5


def test_kohya_with_diffusers_names_and_mflux_spellings(tmp_path):
    rng = np.random.default_rng(2)
    A, B = rng.normal(size=(2, DIM)), rng.normal(size=(DIM, 2))
    A_mlp, B_mlp = rng.normal(size=(2, DIM)), rng.normal(size=(MLP, 2))
    kohya = write(tmp_path / "k.safetensors", {
        "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight": A,
        "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_up.weight": B,
        "lora_transformer_transformer_blocks_1_attn_to_add_out.lora_down.weight": A,
        "lora_transformer_transformer_blocks_1_attn_to_add_out.lora_up.weight": B,
        "lora_transformer_transformer_blocks_1_attn_to_add_out.alpha": np.array(1.0),
    })
    loaded = load_lora_file(kohya, tiny_flux())
    assert set(loaded.adapters) == {"single_transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_add_out"}
    assert loaded.adapters["transformer_blocks.1.attn.to_add_out"][0].scale == 0.5
    mflux = write(tmp_path / "m.safetensors", {
        "transformer.transformer_blocks.0.ff.linear1.lora_A": A_mlp, "transformer.transformer_blocks.0.ff.linear1.lora_B": B_mlp,
        "transformer.transformer_blocks.0.attn.to_out.lora_A": A, "transformer.transformer_blocks.0.attn.to_out.lora_B": B,
    })
    loaded = load_lora_file(mflux, tiny_flux())
    assert loaded.format == "mflux"
    assert set(loaded.adapters) == {"transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.attn.to_out.0"}


def test_comfyui_style_bfl_names_with_peft_suffixes(tmp_path):
    rng = np.random.default_rng(4)
    down, up = rng.normal(size=(2, DIM)), rng.normal(size=(3 * DIM, 2))
    path = write(tmp_path / "c.safetensors", {
        "diffusion_model.double_blocks.1.img_attn.qkv.lora_A.weight": down,
        "diffusion_model.double_blocks.1.img_attn.qkv.lora_B.weight": up,
        "diffusion_model.single_blocks.0.modulation.lin.lora_down.weight": down,
        "diffusion_model.single_blocks.0.modulation.lin.lora_up.weight": up,
    })
    loaded = load_lora_file(path, tiny_flux())
    assert loaded.naming == "bfl"
    assert set(loaded.adapters) == {"transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.to_k",
                                    "transformer_blocks.1.attn.to_v", "single_transformer_blocks.0.norm.linear"}
    (_, B, _), = loaded.adapters["transformer_blocks.1.attn.to_k"]
    assert np.array_equal(np.array(B), up[DIM:2 * DIM].astype(np.float32))


def test_unknown_keys_are_reported_and_logged(tmp_path, caplog):
    rng = np.random.default_rng(3)
    A, B = rng.normal(size=(2, DIM)), rng.normal(size=(DIM, 2))
    path = write(tmp_path / "u.safetensors", {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": A,
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": B,
        "transformer.transformer_blocks.7.attn.to_q.lora_A.weight": A,  # no block 7 in the tiny model
        "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": B,
        "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": B[:, 0],
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": A,
    })
    with caplog.at_level(logging.WARNING, logger="engine.lora_formats"):
        loaded = load_lora_file(path, tiny_flux())
    assert set(loaded.adapters) == {"transformer_blocks.0.attn.to_q"}
    assert loaded.unmatched_keys == sorted([
        "transformer.transformer_blocks.7.attn.to_q.lora_A.weight",
        "transformer.transformer_blocks.7.attn.to_q.lora_B.weight",
        "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"])
    assert "4 key(s)" in caplog.text


def test_stable_diffusion_lora_is_refused_with_a_clear_message(tmp_path):
    path = write(tmp_path / "sd.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.ones((4, 320)),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.ones((320, 4)),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.array(4.0),
    })
    with pytest.raises(LoraFormatError, match="Stable Diffusion"):
        load_lora_file(path, tiny_flux())


def test_shapes_for_another_model_are_refused(tmp_path):
    path = write(tmp_path / "big.safetensors", {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((4, 3072)),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.ones((3072, 4)),
    })
    with pytest.raises(LoraFormatError, match="does not fit"):
        load_lora_file(path, tiny_flux())


def test_unreadable_file_is_a_format_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(LoraFormatError):
        load_lora_file(str(bad))


def test_several_files_add_up_with_their_scales(tmp_path):
    first, second = trained_model(seed=4), trained_model(seed=5)
    save_diffusers(str(tmp_path / "1.safetensors"), first)
    save_kohya(str(tmp_path / "2.safetensors"), second)
    model = tiny_flux()
    bases = {p: get_module(model, p) for p, _ in TARGETS}
    report = attach_lora_files(model, [(str(tmp_path / "1.safetensors"), 0.5), (str(tmp_path / "2.safetensors"), 2.0)])
    assert report.layers == sorted(bases) and report.unmatched_keys == {}
    assert [f.format for f in report.files] == ["diffusers", "kohya"]
    d1, d2 = lora_deltas(first), lora_deltas(second)
    for path, base in bases.items():
        x = x_for(base)
        expected = np.array(base(x)) + np.array(x) @ (0.5 * product(d1[path]) + 2.0 * product(d2[path])).T
        np.testing.assert_allclose(np.array(get_module(model, path)(x)), expected, rtol=1e-5, atol=1e-5)


def test_a_file_attached_over_a_training_adapter_stacks_and_keeps_it_trainable(tmp_path):
    model = trained_model(seed=4)
    save_mflux(str(tmp_path / "f.safetensors"), trained_model(seed=6))
    attach_lora_files(model, [(str(tmp_path / "f.safetensors"), 1.0)])
    path = TARGETS[0][0]
    assert isinstance(get_module(model, path).base, LoRALinear)
    trainable = {k for k, _ in mlx_flatten(model.trainable_parameters())}
    assert f"{path}.base.lora_A" in trainable and f"{path}.lora_A" not in trainable
    assert len(lora_deltas(model)[path]) == 2
    assert isinstance(lora_deltas(model)[path][0], LoraDelta)


def test_compiled_training_step_updates_only_adapters_like_eager():
    from mlx.utils import tree_map

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(DIM, MLP), nn.Linear(MLP, DIM)]

        def __call__(self, x):
            return self.layers[1](nn.gelu(self.layers[0](x)))

    def train(compiled):
        mx.random.seed(0)
        model = Chain()
        apply_lora(model, [("layers.0", 4), ("layers.1", 2)], key=mx.random.key(0))
        x, target = mx.random.normal((5, DIM), key=mx.random.key(1)), mx.random.normal((5, DIM), key=mx.random.key(2))
        loss_and_grad = nn.value_and_grad(model, lambda m: nn.losses.mse_loss(m(x), target))
        grads_seen = []

        def step():
            loss, grads = loss_and_grad(model)
            model.update(tree_map(lambda p, g: p - 0.5 * g, model.trainable_parameters(), grads))
            return loss, grads

        run = mx.compile(step, inputs=model.state, outputs=model.state) if compiled else step
        losses = []
        for _ in range(3):
            loss, grads = run()
            mx.eval(loss, model.state)
            losses.append(loss.item())
            grads_seen.append(dict(mlx_flatten(grads)))
        return model, losses, grads_seen

    eager_model, eager_losses, grads = train(compiled=False)
    compiled_model, compiled_losses, _ = train(compiled=True)
    assert set(grads[0]) == {"layers.0.lora_A", "layers.0.lora_B", "layers.1.lora_A", "layers.1.lora_B"}
    assert not mx.any(grads[0]["layers.0.lora_A"]).item()  # B = 0: A learns from step 1 on
    assert mx.any(grads[0]["layers.0.lora_B"]).item()
    assert eager_losses[2] < eager_losses[0]
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-5)
    assert mx.array_equal(eager_model.layers[0].base.weight, compiled_model.layers[0].base.weight)
