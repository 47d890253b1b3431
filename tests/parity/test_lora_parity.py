"""LoRA files change our transformer exactly as they change diffusers' one.

diffusers (with peft) is the reference for reading: `FluxPipeline.load_lora_weights`
on a pipeline holding only a tiny random FluxTransformer2DModel, against
`attach_lora_files` on the same weights in our FluxTransformer. It is also
the reader for what we write: files exported from our adapters must give
diffusers our adapter's output.
"""
import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

pytest.importorskip("peft", reason="diffusers needs peft to load LoRAs")
from diffusers import FluxPipeline, FluxTransformer2DModel

from engine.flux.transformer import FluxTransformer
from engine.lora import apply_lora, get_module, lora_deltas, remove_lora
from engine.lora_formats import (
    GLOBAL_LAYERS,
    JOINT_BLOCK_LAYERS,
    SINGLE_BLOCK_LAYERS,
    attach_lora_files,
    load_lora_file,
    save_diffusers,
    save_kohya,
)

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=[4, 6, 6])
# diffusers splits kohya's single-block linear1 at FLUX.1's real widths only (3072 x3 + 12288)
FULL_WIDTH_SINGLE = dict(TINY, num_layers=0, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                         axes_dims_rope=[16, 56, 56], guidance_embeds=False)


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def make_pair(config, seed=0):
    """A diffusers pipeline around a random transformer, and ours with the same weights."""
    torch.manual_seed(seed)
    reference = FluxTransformer2DModel(**config).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0.0, 0.05)
    pipeline = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=reference)
    ours = FluxTransformer(config)
    ours.load_weights([(k, mx.array(v.numpy())) for k, v in reference.state_dict().items()], strict=True)
    return pipeline, ours


def make_inputs(config, grid=(3, 4), text_length=5, seed=1):
    rng = np.random.default_rng(seed)
    ids = np.zeros((*grid, 3), dtype=np.float32)
    ids[..., 1], ids[..., 2] = np.arange(grid[0])[:, None], np.arange(grid[1])[None, :]
    inputs = dict(
        hidden_states=rng.standard_normal((1, grid[0] * grid[1], config["in_channels"]), dtype=np.float32),
        encoder_hidden_states=rng.standard_normal((1, text_length, config["joint_attention_dim"]), dtype=np.float32),
        pooled_projections=rng.standard_normal((1, config["pooled_projection_dim"]), dtype=np.float32),
        timestep=np.array([0.6], dtype=np.float32),
        img_ids=ids.reshape(-1, 3),
        txt_ids=np.zeros((text_length, 3), dtype=np.float32),
    )
    if config["guidance_embeds"]:
        inputs["guidance"] = np.array([3.5], dtype=np.float32)
    return inputs


def run_reference(pipeline, inputs):
    with torch.no_grad():
        return pipeline.transformer(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=False)[0].numpy()


def run_ours(model, inputs):
    return np.array(model(**{k: mx.array(v) for k, v in inputs.items()}))


def assert_same_change(pipeline, ours, inputs, base):
    expected, got = run_reference(pipeline, inputs), run_ours(ours, inputs)
    assert relative_error(expected, base) > 1e-2  # the LoRA really changed the output
    assert relative_error(got, expected) < 1e-4


def dims(model, path):
    layer = get_module(model, path)
    return layer.weight.shape[1], layer.weight.shape[0]


def random_pair(rng, rank, in_dims, out_dims):
    return (rng.standard_normal((rank, in_dims)) * 0.3).astype(np.float32), \
        (rng.standard_normal((out_dims, rank)) * 0.3).astype(np.float32)


def all_layer_paths(config):
    paths = list(GLOBAL_LAYERS if config["guidance_embeds"] else [p for p in GLOBAL_LAYERS if "guidance" not in p])
    paths += [f"transformer_blocks.{i}.{layer}" for i in range(config["num_layers"]) for layer in JOINT_BLOCK_LAYERS]
    paths += [f"single_transformer_blocks.{i}.{layer}" for i in range(config["num_single_layers"])
              for layer in SINGLE_BLOCK_LAYERS]
    return paths


def test_diffusers_file_with_alphas_matches_diffusers(tmp_path):
    pipeline, ours = make_pair(TINY)
    inputs = make_inputs(TINY)
    base = run_reference(pipeline, inputs)
    assert relative_error(run_ours(ours, inputs), base) < 1e-4
    rng = np.random.default_rng(2)
    tensors = {}
    for index, path in enumerate(all_layer_paths(TINY)):
        rank, alpha = (2, 1.0) if path.endswith("proj_out") else ((2, 4, 3)[index % 3], (1.0, 4.0, 6.0)[index % 3])
        # (PEFT matches alpha patterns by suffix, so diffusers would give every
        # *.proj_out the alpha of the top-level proj_out; we read each key's own)
        down, up = random_pair(rng, rank, *dims(ours, path))
        tensors[f"transformer.{path}.lora_A.weight"] = down
        tensors[f"transformer.{path}.lora_B.weight"] = up
        tensors[f"transformer.{path}.alpha"] = np.array(alpha, dtype=np.float32)
    save_file(tensors, str(tmp_path / "d.safetensors"))

    pipeline.load_lora_weights(str(tmp_path / "d.safetensors"))
    report = attach_lora_files(ours, [(str(tmp_path / "d.safetensors"), 1.0)])
    assert report.unmatched_keys == {} and len(report.layers) == len(all_layer_paths(TINY))
    assert_same_change(pipeline, ours, inputs, base)


def kohya_group(tensors, name, down, up, alpha=None):
    tensors[f"lora_unet_{name}.lora_down.weight"] = down
    tensors[f"lora_unet_{name}.lora_up.weight"] = up
    if alpha is not None:
        tensors[f"lora_unet_{name}.alpha"] = np.array(alpha, dtype=np.float32)


def test_kohya_file_with_bfl_names_matches_diffusers(tmp_path):
    pipeline, ours = make_pair(TINY)
    inputs = make_inputs(TINY)
    base = run_reference(pipeline, inputs)
    dim = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    rng = np.random.default_rng(3)
    tensors = {}
    shapes = {"img_attn_qkv": (dim, 3 * dim), "txt_attn_qkv": (dim, 3 * dim), "img_attn_proj": (dim, dim),
              "txt_attn_proj": (dim, dim), "img_mod_lin": (dim, 6 * dim), "txt_mod_lin": (dim, 6 * dim),
              "img_mlp_2": (4 * dim, dim), "txt_mlp_2": (4 * dim, dim)}
    for block in range(TINY["num_layers"]):
        for index, (name, (in_dims, out_dims)) in enumerate(shapes.items()):
            kohya_group(tensors, f"double_blocks_{block}_{name}", *random_pair(rng, 4, in_dims, out_dims),
                        alpha=(2.0, 4.0, 8.0)[index % 3])
        kohya_group(tensors, f"double_blocks_{block}_img_mlp_0", *random_pair(rng, 2, dim, 4 * dim), alpha=1.0)
        kohya_group(tensors, f"double_blocks_{block}_txt_mlp_0", *random_pair(rng, 3, dim, 4 * dim))
    # a block-diagonal qkv (what trainers of unfused layers write): diffusers chunks it, we drop zero columns
    down, up = random_pair(rng, 6, dim, 3 * dim)
    for part in range(3):
        up[part * dim:(part + 1) * dim, [c for c in range(6) if c // 2 != part]] = 0
    kohya_group(tensors, "double_blocks_1_img_attn_qkv", down, up, alpha=3.0)
    for block in range(TINY["num_single_layers"]):
        kohya_group(tensors, f"single_blocks_{block}_linear2", *random_pair(rng, 4, 5 * dim, dim), alpha=2.0)
        kohya_group(tensors, f"single_blocks_{block}_modulation_lin", *random_pair(rng, 2, dim, 3 * dim), alpha=4.0)
    # (layers outside the blocks: diffusers 0.42 drops them from kohya files, see the converter test below)
    save_file(tensors, str(tmp_path / "k.safetensors"))

    pipeline.load_lora_weights(str(tmp_path / "k.safetensors"))
    report = attach_lora_files(ours, [(str(tmp_path / "k.safetensors"), 1.0)])
    assert report.unmatched_keys == {} and report.files[0].naming == "bfl"
    assert_same_change(pipeline, ours, inputs, base)


EXPORT_TARGETS = [
    ("transformer_blocks.0.attn.to_q", 2), ("transformer_blocks.0.attn.to_v", 4),  # k untrained
    ("transformer_blocks.0.attn.add_k_proj", 3), ("transformer_blocks.0.attn.to_out.0", 2),
    ("transformer_blocks.0.attn.to_add_out", 2), ("transformer_blocks.0.ff.net.0.proj", 4),
    ("transformer_blocks.1.ff.net.2", 2), ("transformer_blocks.1.ff_context.net.0.proj", 2),
    ("transformer_blocks.1.ff_context.net.2", 3), ("transformer_blocks.1.norm1.linear", 2),
    ("transformer_blocks.1.norm1_context.linear", 2), ("transformer_blocks.1.attn.to_k", 2),
    ("single_transformer_blocks.0.proj_out", 4), ("single_transformer_blocks.1.norm.linear", 2),
]
OUTSIDE_BLOCKS = [("norm_out.linear", 2), ("x_embedder", 2), ("time_text_embed.guidance_embedder.linear_2", 3)]


def trained_adapter(model, targets, seed=4):
    apply_lora(model, targets, key=mx.random.key(seed))
    rng = np.random.default_rng(seed)
    for path in lora_deltas(model):
        layer = get_module(model, path)
        layer.set_weights(*(mx.array(a) for a in random_pair(rng, layer.rank, layer.input_dims, layer.output_dims)))


@pytest.mark.parametrize("save, targets", [(save_diffusers, EXPORT_TARGETS + OUTSIDE_BLOCKS),
                                           (save_kohya, EXPORT_TARGETS)])
def test_files_we_export_give_diffusers_our_output(tmp_path, save, targets):
    pipeline, ours = make_pair(TINY)
    inputs = make_inputs(TINY)
    base = run_reference(pipeline, inputs)
    trained_adapter(ours, targets)
    save(str(tmp_path / "ours.safetensors"), ours)
    pipeline.load_lora_weights(str(tmp_path / "ours.safetensors"))
    assert_same_change(pipeline, ours, inputs, base)


def test_several_files_with_scales_match_diffusers_adapters_with_weights(tmp_path):
    pipeline, ours = make_pair(TINY)
    inputs = make_inputs(TINY)
    base = run_reference(pipeline, inputs)
    for index, (seed, save) in enumerate([(5, save_diffusers), (6, save_kohya)]):
        _, source = make_pair(TINY)
        trained_adapter(source, EXPORT_TARGETS[:10] if index == 0 else EXPORT_TARGETS[5:], seed=seed)  # overlapping
        save(str(tmp_path / f"{index}.safetensors"), source)
        pipeline.load_lora_weights(str(tmp_path / f"{index}.safetensors"), adapter_name=f"file{index}")
    pipeline.set_adapters(["file0", "file1"], adapter_weights=[0.7, -1.5])
    attach_lora_files(ours, [(str(tmp_path / "0.safetensors"), 0.7), (str(tmp_path / "1.safetensors"), -1.5)])
    assert_same_change(pipeline, ours, inputs, base)


def test_kohya_layers_outside_the_blocks_convert_like_diffusers(tmp_path):
    """diffusers' loader drops these (its converter names them without the
    "transformer." prefix), so compare with the converter itself."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_kohya_flux_lora_to_diffusers,
    )

    _, ours = make_pair(TINY)
    dim = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    rng = np.random.default_rng(8)
    tensors = {}
    kohya_group(tensors, "img_in", *random_pair(rng, 2, TINY["in_channels"], dim), alpha=1.0)
    kohya_group(tensors, "txt_in", *random_pair(rng, 4, TINY["joint_attention_dim"], dim), alpha=1.0)
    for embedder, in_dims in (("time_in", 256), ("vector_in", TINY["pooled_projection_dim"]), ("guidance_in", 256)):
        kohya_group(tensors, f"{embedder}_in_layer", *random_pair(rng, 2, in_dims, dim), alpha=8.0)
        kohya_group(tensors, f"{embedder}_out_layer", *random_pair(rng, 4, dim, dim))
    # the converter ignores alpha on final_layer keys ("TODO: alphas"): leave it out
    kohya_group(tensors, "final_layer_linear", *random_pair(rng, 2, dim, TINY["in_channels"]))
    kohya_group(tensors, "final_layer_adaLN_modulation_1", *random_pair(rng, 2, dim, 2 * dim))
    save_file(tensors, str(tmp_path / "k.safetensors"))

    converted = _convert_kohya_flux_lora_to_diffusers({k: torch.from_numpy(v) for k, v in tensors.items()})
    expected = {k[: -len(".lora_A.weight")]: (converted[k].numpy(), converted[k.replace("lora_A", "lora_B")].numpy())
                for k in converted if k.endswith(".lora_A.weight")}
    loaded = load_lora_file(str(tmp_path / "k.safetensors"), ours)
    assert set(loaded.adapters) == set(expected) and len(expected) == 10
    for path, (down, up) in expected.items():
        (A, B, scale), = loaded.adapters[path]
        np.testing.assert_allclose(scale * np.array(B) @ np.array(A), up @ down, rtol=1e-6, atol=1e-7)


def test_fused_single_block_linear1_at_flux_width(tmp_path):
    """kohya's linear1 (q, k, v, MLP in one) both ways, at FLUX.1's real width."""
    config = FULL_WIDTH_SINGLE
    pipeline, ours = make_pair(config)
    inputs = make_inputs(config, grid=(2, 2), text_length=3)
    base = run_reference(pipeline, inputs)
    dim = 3072
    rng = np.random.default_rng(7)
    tensors = {}
    kohya_group(tensors, "single_blocks_0_linear1", *random_pair(rng, 4, dim, 7 * dim), alpha=2.0)
    kohya_group(tensors, "single_blocks_0_linear2", *random_pair(rng, 2, 5 * dim, dim), alpha=2.0)
    save_file(tensors, str(tmp_path / "k.safetensors"))
    pipeline.load_lora_weights(str(tmp_path / "k.safetensors"), adapter_name="theirs")
    attach_lora_files(ours, [(str(tmp_path / "k.safetensors"), 1.0)])
    assert_same_change(pipeline, ours, inputs, base)

    pipeline.delete_adapters("theirs")
    remove_lora(ours)
    source = ours
    trained_adapter(source, [("single_transformer_blocks.0.attn.to_q", 2), ("single_transformer_blocks.0.attn.to_v", 3),
                             ("single_transformer_blocks.0.proj_mlp", 4)])
    save_kohya(str(tmp_path / "ours.safetensors"), source)
    pipeline.load_lora_weights(str(tmp_path / "ours.safetensors"))
    assert relative_error(run_reference(pipeline, inputs), run_ours(source, inputs)) < 1e-4
