"""The loader on models saved by diffusers/transformers in the Hugging Face layout, and its errors."""
from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

from engine.errors import ModelAccessError, ModelLoadError
from engine.flux.hub import resolve_model_path
from engine.flux.loading import load_model
from engine.flux.tiny import ensure_tiny_model


def randomize(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def relative_error(ours, theirs) -> float:
    a = np.array(ours.astype(mx.float32))
    b = theirs.detach().float().numpy()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def saved_model(tmp_path):
    """The tiny model re-saved by diffusers/transformers with random weights, sharded."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    source = ensure_tiny_model()
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    transformer = FluxTransformer2DModel.from_pretrained(source / "transformer")
    randomize(transformer, 1)
    shutil.rmtree(folder / "transformer")
    transformer.save_pretrained(folder / "transformer", max_shard_size="1MB")  # sharded, with an index
    vae = AutoencoderKL.from_pretrained(source / "vae")
    randomize(vae, 2)
    vae.save_pretrained(folder / "vae")
    clip = CLIPTextModel.from_pretrained(source / "text_encoder")
    randomize(clip, 3)
    clip.save_pretrained(folder / "text_encoder")
    t5 = T5EncoderModel.from_pretrained(source / "text_encoder_2")
    randomize(t5, 4)
    t5.save_pretrained(folder / "text_encoder_2", max_shard_size="100KB")
    return folder, dict(transformer=transformer, vae=vae, clip=clip, t5=t5)


def test_loader_reads_what_diffusers_and_transformers_saved(saved_model):
    folder, reference = saved_model
    assert list((folder / "transformer").glob("*.index.json")), "expected a sharded save"
    model = load_model(folder)
    ids = np.array([[5, 17, 33, 2] + [1] * 60])
    hidden = model.t5(mx.array(ids))
    with torch.no_grad():
        expected = reference["t5"](torch.from_numpy(ids)).last_hidden_state
    assert relative_error(hidden, expected) < 1e-4

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 12, 64)).astype(np.float32)
    context = rng.standard_normal((1, 7, 32)).astype(np.float32)
    pooled = rng.standard_normal((1, 32)).astype(np.float32)
    img_ids = np.stack([np.zeros(12), np.repeat(np.arange(3), 4), np.tile(np.arange(4), 3)], 1).astype(np.float32)
    txt_ids = np.zeros((7, 3), np.float32)
    ours = model.transformer(mx.array(x), mx.array(context), mx.array(pooled), mx.array([0.7]), mx.array(img_ids),
                             mx.array(txt_ids), mx.array([3.5]))
    with torch.no_grad():
        theirs = reference["transformer"](hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(context),
                                          pooled_projections=torch.from_numpy(pooled), timestep=torch.tensor([0.7]),
                                          img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids),
                                          guidance=torch.tensor([3.5]), return_dict=False)[0]
    assert relative_error(ours, theirs) < 1e-4


def test_missing_folder_and_unknown_name_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="unknown model"):
        resolve_model_path("not a model name!")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a FLUX.1 model folder"):
        resolve_model_path(str(tmp_path / "empty"))


def test_a_shard_named_in_the_index_but_absent(saved_model):
    folder, _ = saved_model
    shard = sorted((folder / "transformer").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        load_model(folder)


def test_a_tensor_of_the_wrong_shape(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(ensure_tiny_model(), folder)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    key = "decoder.conv_out.weight"
    tensors[key] = np.zeros((3, 8, 3, 5), np.float32)
    save_file(tensors, path)
    with pytest.raises(ModelLoadError, match="decoder.conv_out.weight has shape"):
        load_model(folder)


def test_gated_repo_without_access_says_how_to_get_it(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise errors.LocalEntryNotFoundError("not cached")
        response = type("Response", (), {"headers": {}, "status_code": 403, "request": None})()
        raise errors.GatedRepoError("Access to model black-forest-labs/FLUX.1-dev is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(ModelAccessError) as raised:
        resolve_model_path("dev")
    message = str(raised.value)
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in message and "hf auth login" in message
    assert calls[-1]["allow_patterns"][0] == "model_index.json"
    assert "transformer/*" in calls[-1]["allow_patterns"] and "*.safetensors" not in calls[-1]["allow_patterns"]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_outputs_stay_near_full_precision(bits):
    model = load_model("tiny")
    quantized = load_model("tiny", quantize=bits)
    from mlx.utils import tree_flatten

    assert any(k.endswith(".scales") for k, _ in tree_flatten(quantized.transformer.parameters()))
    rng = np.random.default_rng(1)
    args = (mx.array(rng.standard_normal((1, 16, 64)).astype(np.float32)),
            mx.array(rng.standard_normal((1, 20, 32)).astype(np.float32)),
            mx.array(rng.standard_normal((1, 32)).astype(np.float32)), mx.array([0.5]),
            mx.zeros((16, 3)), mx.zeros((20, 3)), mx.array([3.5]))
    reference, approximate = model.transformer(*args), quantized.transformer(*args)
    error = float(mx.linalg.norm(reference - approximate) / mx.linalg.norm(reference))
    # stated tolerance: 8-bit within 2%, 4-bit within 25% relative (random tiny weights are worst-case)
    assert error < {8: 0.02, 4: 0.25}[bits], error


def test_tiny_model_is_in_the_hugging_face_layout():
    folder = ensure_tiny_model()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert (folder / sub / "config.json").is_file()
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer_2" / "tokenizer.json").is_file()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 30 * 2**20  # small enough to build on any laptop in a second


def test_dequantizing_linears_leave_only_fewer_than_8_rows_to_mlxs_quantized_matmul(monkeypatch):
    # from 8 rows MLX runs its quantized matrix-matrix kernel (on CUDA ~40 s to compile the first time,
    # and slower than dequantize + matmul): only its matrix-vector kernel's sizes go there
    import mlx.nn as nn

    from engine.flux.quantized import DequantizingLinear

    layer = nn.Linear(128, 64)
    mx.eval(layer.parameters())
    quantized = DequantizingLinear.from_quantized(nn.QuantizedLinear.from_linear(layer, group_size=64, bits=4))
    calls = []
    real = mx.quantized_matmul
    monkeypatch.setattr(mx, "quantized_matmul", lambda *args, **kwargs: calls.append(args[0].shape) or real(*args, **kwargs))
    for rows in (1, 7, 8, 77, 300):
        x = mx.random.normal((1, rows, 128))
        stock = real(x, quantized["weight"], quantized["scales"], quantized["biases"], transpose=True, group_size=64,
                     bits=4) + quantized["bias"]
        assert mx.allclose(quantized(x), stock, atol=1e-4, rtol=1e-4)
    assert [shape[1] for shape in calls] == [1, 7]
