"""`dreambooth-wizard export`: a checkpoint's LoRA for diffusers, kohya/ComfyUI and mflux.

diffusers is the judge: its FluxPipeline, loaded from the tiny model's folder,
takes our diffusers and kohya files with `load_lora_weights`, and its
transformer must then change exactly as ours does with the checkpoint's adapter.
"""
from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

from engine.checkpoint import read_checkpoint
from engine.config import load_config, lora_targets
from engine.export import adapter_from_bytes
from engine.trainer import Trainer
from tests.helpers import make_training_folder
from tui.cli import main

torch = pytest.importorskip("torch")
pytest.importorskip("peft", reason="diffusers needs peft to load LoRAs")

# joint layers in mflux's and diffusers' spellings, single blocks outside the fused linear1
# (diffusers splits kohya's linear1 at FLUX.1's real widths only, see tests/parity/test_lora_parity.py);
# no norm1_context.linear: with norm1.linear in two or more joint blocks, MLX 0.32.4's compiled
# training step fails (IndexError _Map_base::at), reported to the trainer's owner
EVERY_FORMAT = {
    "transformer_blocks": {"block_range": {"indices": [0, 7, 18]}, "lora_rank": 4,
                           "layer_types": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "attn.add_k_proj",
                                           "attn.to_add_out", "ff.linear1", "ff.net.2", "ff_context.linear2",
                                           "norm1.linear"]},
    "single_transformer_blocks": {"block_range": {"start": 30, "end": 38}, "lora_rank": 8,
                                  "layer_types": ["proj_out", "norm.linear"]},
}
# the usual DreamBooth choice: attention and MLP of every single block
SINGLE_ATTENTION = {
    "single_transformer_blocks": {"block_range": {"start": 0, "end": 38}, "lora_rank": 4,
                                  "layer_types": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]},
}


def train(folder, lora_layers):
    # a high learning rate so three steps move the adapter well away from zero
    config = make_training_folder(folder, count=1, size=64, training_loop={"num_epochs": 3, "batch_size": 1},
                                  optimizer={"name": "AdamW", "learning_rate": 1e-2}, lora_layers=lora_layers)
    result = Trainer(load_config(config)).run()
    return config, result.checkpoint_path


@pytest.fixture(scope="module")
def every_format(tmp_path_factory):
    return train(tmp_path_factory.mktemp("every"), EVERY_FORMAT)


@pytest.fixture(scope="module")
def single_attention(tmp_path_factory):
    return train(tmp_path_factory.mktemp("single"), SINGLE_ATTENTION)


@pytest.fixture(scope="module")
def pipeline():
    from diffusers import FluxPipeline

    from engine.flux.tiny import ensure_tiny_model

    return FluxPipeline.from_pretrained(ensure_tiny_model(), dtype=torch.float32)


def export(checkpoint, fmt, output, capsys=None) -> None:
    assert main(["export", "--checkpoint", str(checkpoint), "--format", fmt, "--output", str(output)]) == 0
    if capsys is not None:
        assert f"wrote {fmt} LoRA {output}" in capsys.readouterr().out


def random_inputs(seed: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid, text_length = (4, 4), 6
    ids = np.zeros((*grid, 3), dtype=np.float32)
    ids[..., 1], ids[..., 2] = np.arange(grid[0])[:, None], np.arange(grid[1])[None, :]
    return dict(hidden_states=rng.standard_normal((1, 16, 64), dtype=np.float32),
                encoder_hidden_states=rng.standard_normal((1, text_length, 32), dtype=np.float32),
                pooled_projections=rng.standard_normal((1, 32), dtype=np.float32),
                timestep=np.array([0.7], dtype=np.float32), img_ids=ids.reshape(-1, 3),
                txt_ids=np.zeros((text_length, 3), dtype=np.float32), guidance=np.array([3.5], dtype=np.float32))


def run_theirs(pipeline, inputs) -> np.ndarray:
    with torch.no_grad():
        return pipeline.transformer(**{k: torch.from_numpy(v) for k, v in inputs.items()},
                                    return_dict=False)[0].numpy()


def run_ours(checkpoint, inputs) -> tuple[np.ndarray, np.ndarray]:
    """(base output, output with the checkpoint's adapter) of our transformer, as the trainer builds it."""
    from engine.flux.loading import load_model
    from engine.lora import apply_lora, load_lora_parameters

    contents = read_checkpoint(checkpoint)
    transformer = load_model("tiny", text_encoders=False).transformer
    arrays = {k: mx.array(v) for k, v in inputs.items()}
    base = np.array(transformer(**arrays))
    adapter, _ = adapter_from_bytes(contents.adapter)
    ranks = {key.rpartition(".")[0]: value.shape[0] for key, value in adapter.items() if key.endswith("lora_A")}
    apply_lora(transformer, sorted(ranks.items()), key=mx.random.key(0))
    load_lora_parameters(transformer, adapter)
    return base, np.array(transformer(**arrays))


def relative_error(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("fmt, trained", [("diffusers", "every_format"), ("kohya", "every_format"),
                                          ("diffusers", "single_attention")])
def test_diffusers_loads_the_export_and_changes_like_our_adapter(pipeline, tmp_path, request, capsys, fmt, trained):
    _, checkpoint = request.getfixturevalue(trained)
    output = tmp_path / f"lora-{fmt}.safetensors"
    export(checkpoint, fmt, output, capsys)
    inputs = random_inputs()
    base_theirs = run_theirs(pipeline, inputs)
    base_ours, with_adapter = run_ours(checkpoint, inputs)
    assert relative_error(base_ours, base_theirs) < 1e-4  # the same model to begin with

    pipeline.load_lora_weights(str(output), adapter_name="export")
    try:
        theirs = run_theirs(pipeline, inputs)
    finally:
        pipeline.delete_adapters("export")
    assert relative_error(with_adapter, base_ours) > 1e-2  # the adapter matters
    assert relative_error(with_adapter, theirs) < 1e-4
    # and the change itself, not just the sum, agrees
    assert relative_error(with_adapter - base_ours, theirs - base_theirs) < 1e-4


MFLUX_KEY = re.compile(r"transformer\.(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)\.lora_([AB])")
MFLUX_SPELLING = {"attn.to_out.0": "attn.to_out.0", "ff.net.0.proj": "ff.linear1", "ff.net.2": "ff.linear2",
                  "ff_context.net.2": "ff_context.linear2"}


def test_mflux_export_keys_shapes_and_metadata(every_format, tmp_path, capsys):
    from engine.flux.loading import load_model
    from engine.lora import get_module, linear_dims

    config, checkpoint = every_format
    output = tmp_path / "lora-mflux.safetensors"
    export(checkpoint, "mflux", output, capsys)
    transformer = load_model("tiny", text_encoders=False).transformer
    targets = dict(lora_targets(load_config(config)))
    expected = {}
    for path, rank in targets.items():
        blocks, index, layer = path.split(".", 2)
        name = f"transformer.{blocks}.{index}.{MFLUX_SPELLING.get(layer, layer)}"
        in_dims, out_dims = linear_dims(get_module(transformer, path))
        expected[f"{name}.lora_A"] = (rank, in_dims)
        expected[f"{name}.lora_B"] = (out_dims, rank)
    with safe_open(str(output), "np") as file:
        shapes = {key: file.get_tensor(key).shape for key in file.keys()}
        dtypes = {file.get_tensor(key).dtype for key in file.keys()}
        metadata = file.metadata()
    assert shapes == expected
    assert all(MFLUX_KEY.fullmatch(key) and not key.endswith(".weight") for key in shapes)
    assert "transformer.transformer_blocks.7.ff.linear1.lora_A" in shapes  # mflux's own spelling
    assert dtypes == {np.dtype(np.float32)}
    assert metadata["base_model"] == "tiny" and metadata["lora_rank"] == "4,8" and metadata["trigger_word"] == "sks"
    assert metadata["mflux_version"] and metadata["lora_format"] == "mflux"
    assert metadata["step"] == "3" and metadata["exported_from"] == checkpoint.name

    # the file holds exactly the checkpoint's adapter
    adapter, _ = adapter_from_bytes(read_checkpoint(checkpoint).adapter)
    exported, _ = adapter_from_bytes(output.read_bytes())
    assert adapter.keys() == exported.keys()
    for key in adapter:
        assert mx.array_equal(adapter[key], exported[key]), key


@pytest.mark.parametrize("fmt, suffixes", [("diffusers", (".lora_A.weight", ".lora_B.weight")),
                                           ("kohya", (".lora_down.weight", ".lora_up.weight", ".alpha"))])
def test_other_formats_carry_the_same_metadata(every_format, tmp_path, fmt, suffixes):
    _, checkpoint = every_format
    output = tmp_path / f"{fmt}.safetensors"
    export(checkpoint, fmt, output)
    with safe_open(str(output), "np") as file:
        keys, metadata = list(file.keys()), file.metadata()
    assert keys and all(key.endswith(suffixes) for key in keys)
    assert metadata["base_model"] == "tiny" and metadata["lora_rank"] == "4,8" and metadata["trigger_word"] == "sks"
    assert metadata["lora_format"] == fmt


def test_the_final_adapter_is_the_last_checkpoint_s(every_format):
    config, checkpoint = every_format
    final, _ = adapter_from_bytes((config.parent / "out" / "adapter.safetensors").read_bytes())
    last, _ = adapter_from_bytes(read_checkpoint(checkpoint).adapter)
    assert final.keys() == last.keys()
    for key in final:
        assert mx.array_equal(final[key], last[key]), key


def test_export_refuses_a_bad_checkpoint_or_output_cleanly(every_format, tmp_path, capsys):
    _, checkpoint = every_format
    broken = tmp_path / "0000003_checkpoint.zip"
    broken.write_bytes(checkpoint.read_bytes()[:1000])
    assert main(["export", "--checkpoint", str(broken), "--format", "diffusers", "--output",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "not a readable zip" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("not a folder")
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "kohya", "--output",
                 str(tmp_path / "a-file" / "x.safetensors")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "a-file" in error
    assert not (tmp_path / "x.safetensors").exists()


def test_export_given_the_final_lora_or_a_folder_says_what_to_pass(every_format, capsys):
    # "done: LoRA <output>/adapter.safetensors" is what training prints last: a beginner passes it here
    config, checkpoint = every_format
    output = config.parent / "never.safetensors"
    assert main(["export", "--checkpoint", str(config.parent / "out" / "adapter.safetensors"), "-o", str(output)]) == 2
    error = capsys.readouterr().err
    assert "adapter.safetensors is a LoRA file, not a checkpoint" in error and "damaged" not in error
    assert "-> a LoRA is already the result of training" in error and str(checkpoint) in error
    assert main(["export", "--checkpoint", str(config), "-o", str(output)]) == 2
    assert "config.json is a training config" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(config.parent / "out"), "-o", str(output)]) == 2
    error = capsys.readouterr().err
    assert "is a folder" in error and "does not exist" not in error and str(checkpoint) in error
    assert not output.exists()


@pytest.mark.parametrize("given, words", [("", "-o is empty"), ("{tmp}/", "is a folder"), ("{tmp}", "is a folder")])
def test_export_to_an_empty_name_or_a_folder_says_to_name_a_file(every_format, tmp_path, capsys, given, words):
    _, checkpoint = every_format
    assert main(["export", "--checkpoint", str(checkpoint), "-o", given.format(tmp=tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and words in error
    assert "-> " in error and f"{checkpoint.stem.removesuffix('_checkpoint')}_diffusers.safetensors" in error
    assert "Device or resource busy" not in error and "Is a directory" not in error
    assert list(tmp_path.iterdir()) == []


def test_export_to_a_folder_it_may_not_write_says_what_to_do(every_format, tmp_path, capsys, monkeypatch):
    # as root nothing is refused, so the refusal is the one mkstemp raises for other users
    import tempfile

    _, checkpoint = every_format

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    assert main(["export", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "x.safetensors")]) == 2
    error = capsys.readouterr().err
    assert "Permission denied" in error and "\n  -> " in error and "folder you can write to" in error
