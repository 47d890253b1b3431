"""Checkpoint zips: mflux's layout (FORMATS.md section 3) written atomically, ours and mflux's read, damage refused."""
from __future__ import annotations

import json
import os
import random
import time
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from engine.checkpoint import (
    read_loss_history,
    CheckpointContents,
    list_checkpoints,
    read_checkpoint,
    remove_stale_partials,
    write_checkpoint,
)
from engine.config import load_config, parse_config
from engine.errors import CheckpointError, OutputError
from engine.export import adapter_from_bytes
from engine.trainer import Trainer
from tests.helpers import make_training_folder

ITERATOR_KEYS = {"position", "epoch", "num_iterations", "current_permutation", "rng_state", "batch_size",
                 "num_epochs", "start_date_time"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps on two 64-pixel images, a checkpoint after each."""
    folder = tmp_path_factory.mktemp("trained")
    config = make_training_folder(folder, count=2, size=64, training_loop={"num_epochs": 1, "batch_size": 1},
                                  save={"checkpoint_frequency": 1})
    result = Trainer(load_config(config)).run()
    return folder, result


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def rezip(path: Path, contents: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    return path


def test_member_names_and_json_members_are_mflux_s(trained):
    folder, result = trained
    assert result.step == 2
    zips = sorted((folder / "out" / "_checkpoints").iterdir())
    assert [p.name for p in zips] == ["0000001_checkpoint.zip", "0000002_checkpoint.zip"]
    contents = members(zips[1])
    assert set(contents) == {"0000002_adapter.safetensors", "0000002_optimizer.safetensors", "0000002_iterator.json",
                             "0000002_loss.json", "0000002_config.json", "checkpoint.json"}

    iterator = json.loads(contents["0000002_iterator.json"])
    assert ITERATOR_KEYS <= set(iterator)
    assert iterator["num_iterations"] == 2 and iterator["batch_size"] == 1 and iterator["num_epochs"] == 1
    assert sorted(iterator["current_permutation"]) == [0, 1]
    datetime.fromisoformat(iterator["start_date_time"])

    loss = json.loads(contents["0000002_loss.json"])
    assert [set(entry) for entry in loss] == [{"step", "loss", "time"}] * 2
    assert [entry["step"] for entry in loss] == [1, 2]
    assert all(np.isfinite(entry["loss"]) and entry["loss"] > 0 for entry in loss)
    assert loss[0]["time"] <= loss[1]["time"]

    config = json.loads(contents["0000002_config.json"])
    assert Path(config["examples"]["path"]).is_absolute()
    assert Path(config["examples"]["path"]) == (folder / "images").resolve()
    assert [e["image"] for e in config["examples"]["images"]] == ["00.png", "01.png"]
    # the config alone, read anywhere, finds the images again
    assert all(path.is_file() for path in parse_config(config, "/").image_paths)

    manifest = json.loads(contents["checkpoint.json"])
    assert manifest["files"] == {"config": "0000002_config.json", "optimizer": "0000002_optimizer.safetensors",
                                 "lora_adapter": "0000002_adapter.safetensors", "iterator": "0000002_iterator.json",
                                 "loss": "0000002_loss.json"}
    assert set(manifest["metadata"]) == {"start", "end", "duration", "number_of_training_examples"}
    assert manifest["metadata"]["number_of_training_examples"] == 2


def test_adapter_and_optimizer_members(trained):
    folder, _ = trained
    contents = members(folder / "out" / "_checkpoints" / "0000002_checkpoint.zip")
    adapter = load_safetensors(contents["0000002_adapter.safetensors"])
    assert adapter and all(key.startswith("transformer.single_transformer_blocks.") for key in adapter)
    assert all(key.endswith((".lora_A", ".lora_B")) for key in adapter)
    assert all(value.dtype == np.float32 for value in adapter.values())
    a, b = adapter["transformer.single_transformer_blocks.0.attn.to_q.lora_A"], \
        adapter["transformer.single_transformer_blocks.0.attn.to_q.lora_B"]
    assert a.shape == (4, 64) and b.shape == (64, 4) and np.abs(b).max() > 0  # trained: B left zero

    # mflux's optimizer state: under "transformer.", each LoRA matrix transposed (its B is (r, out))
    optimizer = load_safetensors(contents["0000002_optimizer.safetensors"])
    moments = [key for key in optimizer if ".single_transformer_blocks.0.attn.to_q.lora_B" in key]
    assert sorted(moments) == ["transformer.single_transformer_blocks.0.attn.to_q.lora_B.m",
                               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.v"]  # AdamW's two moments
    assert not [key for key in optimizer if key.startswith("single_transformer_blocks")]
    stored = optimizer["transformer.single_transformer_blocks.0.attn.to_q.lora_B.m"]
    assert stored.shape == (4, 64) and np.abs(stored).max() > 0
    assert int(optimizer["step"]) == 2
    read = read_checkpoint(folder / "out" / "_checkpoints" / "0000002_checkpoint.zip").optimizer
    np.testing.assert_array_equal(np.array(read["single_transformer_blocks.0.attn.to_q.lora_B.m"]), stored.T)


def test_optimizer_state_converts_to_mflux_names_and_back_exactly():
    import mlx.core as mx

    from engine.checkpoint import optimizer_state_for_mflux, optimizer_state_from_mflux

    rng = np.random.default_rng(3)
    ours = {"step": mx.array(7, dtype=mx.uint64), "learning_rate": mx.array(1e-4),
            "transformer_blocks.2.ff.net.0.proj.lora_A.m": mx.array(rng.standard_normal((4, 64), dtype=np.float32)),
            "transformer_blocks.2.ff_context.net.2.lora_B.v": mx.array(rng.standard_normal((64, 4), dtype=np.float32)),
            "transformer_blocks.2.attn.to_out.0.lora_B.m": mx.array(rng.standard_normal((64, 4), dtype=np.float32)),
            "single_transformer_blocks.9.proj_out.lora_A.exp_avg_sq_row": mx.array(rng.random(4, dtype=np.float32))}
    theirs = optimizer_state_for_mflux(ours)
    assert set(theirs) == {"step", "learning_rate", "transformer.transformer_blocks.2.ff.linear1.lora_A.m",
                           "transformer.transformer_blocks.2.ff_context.linear2.lora_B.v",
                           "transformer.transformer_blocks.2.attn.to_out.0.lora_B.m",
                           "transformer.single_transformer_blocks.9.proj_out.lora_A.exp_avg_sq_row"}
    assert theirs["transformer.transformer_blocks.2.ff.linear1.lora_A.m"].shape == (64, 4)
    back = optimizer_state_from_mflux(theirs)
    assert set(back) == set(ours)
    for key in ours:
        assert back[key].dtype == ours[key].dtype and mx.array_equal(back[key], ours[key]), key


def test_read_checkpoint_returns_what_was_written(trained):
    folder, result = trained
    contents = read_checkpoint(result.checkpoint_path)
    assert contents.step == 2 and [e["step"] for e in contents.loss] == [1, 2]
    flat, metadata = adapter_from_bytes(contents.adapter)
    assert "single_transformer_blocks.37.proj_out.lora_B" in flat
    assert metadata["base_model"] == "tiny" and metadata["trigger_word"] == "sks"
    assert [info.step for info in list_checkpoints(folder / "out")] == [1, 2]


def test_checkpoint_files_get_ordinary_permissions(trained):
    folder, _ = trained
    umask = os.umask(0)
    os.umask(umask)
    for path in (folder / "out" / "_checkpoints").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def mflux_style_zip(trained_folder: Path, path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A zip laid out the way mflux 0.15.5 writes one: deflated, its own JSON spellings, its
    optimizer keys (under "transformer."), Python's random state, its adapter format."""
    rng = np.random.default_rng(0)
    adapter = {}
    for block in (0, 1):
        adapter[f"transformer.single_transformer_blocks.{block}.attn.to_q.lora_A"] = rng.standard_normal((4, 64), dtype=np.float32)
        adapter[f"transformer.single_transformer_blocks.{block}.attn.to_q.lora_B"] = rng.standard_normal((64, 4), dtype=np.float32)
    metadata = {"mflux_version": "0.15.5", "transformer_blocks": "None",
                "single_transformer_blocks": "SingleTransformerBlocks(block_range=BlockRange(start=0, end=2, indices=None), "
                                             "layer_types=['attn.to_q'], lora_rank=4)"}
    optimizer = {"step": np.array(3, dtype=np.uint64), "learning_rate": np.array(1e-4, dtype=np.float32)}
    for key, value in adapter.items():  # mflux keeps its LoRA matrices transposed: A (in, r), B (r, out)
        optimizer[f"{key}.m"] = rng.standard_normal(value.T.shape, dtype=np.float32) * 1e-3
        optimizer[f"{key}.v"] = rng.random(value.T.shape, dtype=np.float32) * 1e-6
    config = json.loads((trained_folder / "config.json").read_text())
    config["examples"]["path"] = str((trained_folder / "images").resolve())
    config["lora_layers"] = {"single_transformer_blocks": {"block_range": {"start": 0, "end": 2},
                                                           "layer_types": ["attn.to_q"], "lora_rank": 4}}
    python_random = random.Random(42)
    iterator = {"position": 1, "epoch": 1, "num_iterations": 3, "current_permutation": [1, 0],
                "rng_state": list(python_random.getstate()), "batch_size": 1, "num_epochs": 2,
                "start_date_time": "2025-03-01 10:00:00"}
    loss = [{"step": step, "loss": 0.5 - 0.01 * step, "time": f"2025-03-01 10:00:0{step}"} for step in (1, 2, 3)]
    manifest = {"metadata": {"start": "2025-03-01 10:00:00", "end": "2025-03-01 10:00:03", "duration": "3 seconds",
                             "number_of_training_examples": 2},
                "files": {"config": "0000003_config.json", "optimizer": "0000003_optimizer.safetensors",
                          "lora_adapter": "0000003_adapter.safetensors", "iterator": "0000003_iterator.json",
                          "loss": "0000003_loss.json"}}
    rezip(path, {  # mflux adds the members in this order
        "0000003_optimizer.safetensors": save_safetensors(optimizer),
        "0000003_adapter.safetensors": save_safetensors(adapter, metadata=metadata),
        "0000003_iterator.json": json.dumps(iterator, indent=4).encode(),
        "0000003_loss.json": json.dumps(loss, indent=4).encode(),
        "0000003_config.json": json.dumps(config, indent=4).encode(),
        "checkpoint.json": json.dumps(manifest, indent=4).encode(),
    }, compression=zipfile.ZIP_DEFLATED)
    return path, adapter, optimizer


def test_an_mflux_written_zip_is_read(trained, tmp_path):
    folder, _ = trained
    path, adapter, optimizer = mflux_style_zip(folder, tmp_path / "0000003_checkpoint.zip")
    contents = read_checkpoint(path)
    assert contents.step == 3
    assert contents.loss[-1] == {"step": 3, "loss": 0.47, "time": "2025-03-01 10:00:03"}
    assert contents.iterator["rng_state"][0] == 3  # Python's random state, kept as mflux wrote it
    # its Adam moments arrive in our names and orientation
    assert set(contents.optimizer) == {"step", "learning_rate"} | {
        f"single_transformer_blocks.{b}.attn.to_q.lora_{m}.{s}" for b in (0, 1) for m in "AB" for s in "mv"}
    np.testing.assert_array_equal(np.array(contents.optimizer["single_transformer_blocks.1.attn.to_q.lora_A.m"]),
                                  optimizer["transformer.single_transformer_blocks.1.attn.to_q.lora_A.m"].T)
    flat, metadata = adapter_from_bytes(contents.adapter)
    assert metadata["mflux_version"] == "0.15.5"
    assert set(flat) == {f"single_transformer_blocks.{b}.attn.to_q.lora_{m}" for b in (0, 1) for m in "AB"}
    np.testing.assert_array_equal(np.array(flat["single_transformer_blocks.1.attn.to_q.lora_B"]),
                                  adapter["transformer.single_transformer_blocks.1.attn.to_q.lora_B"])
    (info,) = list_checkpoints(tmp_path)
    assert info.step == 3 and info.images_present and info.last_loss == pytest.approx(0.47)


def test_an_mflux_written_zip_resumes(trained, tmp_path):
    """Its random state is Python's, so the run continues deterministically but not as mflux would."""
    folder, _ = trained
    path, _, _ = mflux_style_zip(folder, tmp_path / "0000003_checkpoint.zip")
    contents = read_checkpoint(path)
    contents.config["save"]["output_path"] = str(tmp_path / "resumed")
    rezip(path, {**members(path), "0000003_config.json": json.dumps(contents.config).encode()})
    events = []
    result = Trainer.from_checkpoint(path, events.append).run()
    assert result.step == 4 and not result.stopped  # 2 images x 2 epochs, 3 done
    assert [e["step"] for e in events if e["type"] == "step"] == [4]
    resumed = read_checkpoint(result.checkpoint_path)
    assert [e["step"] for e in resumed.loss] == [1, 2, 3, 4]
    # mflux's moments were used, not carried along beside fresh ones
    assert set(resumed.optimizer) == set(contents.optimizer)
    assert int(resumed.optimizer["step"]) == 4


# ---------------------------------------------------------------- damage


def expect_refused(path: Path, *words: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    text = str(caught.value)
    for word in words:
        assert word in text, text
    assert caught.value.hint  # says what to do
    return caught.value


@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "sub/../../evil", "C:evil", "..\\evil"])
def test_a_member_outside_the_zip_is_refused_before_anything_is_read(trained, tmp_path, name):
    folder, result = trained
    path = rezip(tmp_path / "0000002_checkpoint.zip", {**members(result.checkpoint_path), name: b"x"})
    expect_refused(path, "unsafe member", repr(name))
    assert not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize("member, kind", [("0000002_adapter.safetensors", "adapter"),
                                          ("0000002_optimizer.safetensors", "optimizer"),
                                          ("0000002_iterator.json", "iterator"),
                                          ("0000002_loss.json", "loss"), ("0000002_config.json", "config")])
def test_a_missing_member_is_named(trained, tmp_path, member, kind):
    _, result = trained
    contents = members(result.checkpoint_path)
    del contents[member]
    expect_refused(rezip(tmp_path / "0000002_checkpoint.zip", contents), f"lacks its {kind} member")


def test_without_a_manifest_members_are_found_by_name(trained, tmp_path):
    _, result = trained
    contents = members(result.checkpoint_path)
    del contents["checkpoint.json"]
    assert read_checkpoint(rezip(tmp_path / "0000002_checkpoint.zip", contents)).step == 2


def test_every_truncation_is_refused_cleanly(trained, tmp_path):
    _, result = trained
    data = result.checkpoint_path.read_bytes()
    rng = np.random.default_rng(1)
    for cut in sorted({0, 1, 100, len(data) - 1, len(data) - 30, *rng.integers(1, len(data), 12).tolist()}):
        path = tmp_path / f"{cut}_checkpoint.zip"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            read_checkpoint(path)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_flipped_bytes_inside_a_member_are_refused_cleanly(trained, tmp_path, compression):
    _, result = trained
    path = rezip(tmp_path / "0000002_checkpoint.zip", members(result.checkpoint_path), compression)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("0000002_optimizer.safetensors")
    start = info.header_offset + 30 + len(info.filename)  # past the local header
    for offset in range(start + 10, start + info.compress_size - 10, max(1, info.compress_size // 7)):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    expect_refused(path)


@pytest.mark.parametrize("member, value, words", [
    ("0000002_iterator.json", [1, 2], "num_iterations"),
    ("0000002_iterator.json", {"position": 0}, "num_iterations"),
    ("0000002_loss.json", {"step": 1}, "loss history"),
    ("0000002_config.json", ["model"], "config"),
    ("checkpoint.json", [], None),  # a manifest of the wrong shape: members found by name instead
])
def test_json_members_of_the_wrong_shape(trained, tmp_path, member, value, words):
    _, result = trained
    path = rezip(tmp_path / "0000002_checkpoint.zip", {**members(result.checkpoint_path),
                                                        member: json.dumps(value).encode()})
    if words is None:
        assert read_checkpoint(path).step == 2
    else:
        expect_refused(path, words)


def test_not_a_zip_or_not_there(tmp_path):
    (tmp_path / "0000001_checkpoint.zip").write_text("just text")
    expect_refused(tmp_path / "0000001_checkpoint.zip", "not a readable zip")
    expect_refused(tmp_path / "missing.zip", "does not exist")


# ---------------------------------------------------------------- something else given as a checkpoint


def test_an_output_folder_is_a_folder_and_its_newest_checkpoint_is_named(trained, tmp_path):
    folder, _ = trained
    for given in (folder / "out", folder / "out" / "_checkpoints"):
        error = expect_refused(given, "is a folder", "not a checkpoint")
        assert "does not exist" not in str(error)
        assert str(folder / "out" / "_checkpoints" / "0000002_checkpoint.zip") in error.hint
    error = expect_refused(tmp_path, "is a folder")
    assert "no checkpoint" in error.hint and "_checkpoints" in error.hint


def test_the_final_lora_is_called_the_result_not_a_damaged_zip(trained):
    # training ends with "done: LoRA <output>/adapter.safetensors": the file a beginner tries first
    folder, _ = trained
    error = expect_refused(folder / "out" / "adapter.safetensors", "adapter.safetensors is a LoRA file")
    assert "damaged" not in str(error)
    assert "already" in error.hint and "--lora-paths" in error.hint
    assert str(folder / "out" / "_checkpoints" / "0000002_checkpoint.zip") in error.hint


def test_a_training_config_is_called_a_config(trained, tmp_path):
    folder, _ = trained
    error = expect_refused(folder / "config.json", "config.json is a training config")
    assert "damaged" not in str(error) and "--train-config" in error.hint
    assert str(folder / "out" / "_checkpoints" / "0000002_checkpoint.zip") in error.hint  # from its save.output_path
    (tmp_path / "notes.json").write_text('{"loss": [1, 2]}')
    assert "damaged" not in str(expect_refused(tmp_path / "notes.json", "not a checkpoint"))


# ---------------------------------------------------------------- the optimizer state of a resume


def test_the_state_of_another_optimizer_is_named_as_such():
    import mlx.core as mx

    from engine.optimizers import build_optimizer, state_mismatch

    parameters = {"layer": {"lora_A": mx.zeros((2, 8)), "lora_B": mx.zeros((8, 2))}}
    adamw = build_optimizer("AdamW", 1e-3)
    adamw.init(parameters)
    sgd = build_optimizer("SGD", 1e-3)
    sgd.init(parameters)
    problem = state_mismatch(sgd, adamw.state)
    assert "Adam, AdamW or Adamax" in problem and "SGD" in problem
    same = build_optimizer("AdamW", 1e-3)
    same.init(parameters)
    assert state_mismatch(same, adamw.state) is None  # a resume with the same optimizer
    wrong_shape = build_optimizer("AdamW", 1e-3)
    wrong_shape.init({"layer": {"lora_A": mx.zeros((4, 8)), "lora_B": mx.zeros((8, 4))}})
    assert "shape" in state_mismatch(wrong_shape, adamw.state)
    # a weight the saved state does not mention starts afresh, as MLX's own init makes it
    partial = {"step": adamw.state["step"], "layer": {"lora_A": adamw.state["layer"]["lora_A"]}}
    assert state_mismatch(same, partial) is None


def test_resuming_refuses_an_optimizer_state_its_config_does_not_name(trained, tmp_path):
    _, result = trained
    contents = members(result.checkpoint_path)
    config = json.loads(contents["0000002_config.json"])
    config["optimizer"]["name"] = "SGD"  # its state holds AdamW's m and v
    path = rezip(tmp_path / "0000002_checkpoint.zip", {**contents, "0000002_config.json": json.dumps(config).encode()})
    with pytest.raises(CheckpointError) as caught:
        Trainer.from_checkpoint(path).run()
    assert "optimizer state" in str(caught.value) and "SGD" in str(caught.value) and "AdamW" in str(caught.value)
    assert caught.value.hint


def test_listing_skips_damaged_zips_and_temporary_files(trained, tmp_path):
    _, result = trained
    folder = tmp_path / "_checkpoints"
    folder.mkdir()
    good = folder / "0000002_checkpoint.zip"
    good.write_bytes(result.checkpoint_path.read_bytes())
    (folder / "0000003_checkpoint.zip").write_bytes(good.read_bytes()[:500])
    (folder / ".0000004_checkpoint.zip.abc123.partial").write_bytes(good.read_bytes())
    assert [info.path.name for info in list_checkpoints(tmp_path)] == ["0000002_checkpoint.zip"]


# ---------------------------------------------------------------- writing


def small_contents(step: int) -> CheckpointContents:
    import mlx.core as mx

    adapter = save_safetensors({"transformer.single_transformer_blocks.0.attn.to_q.lora_A": np.ones((2, 4), np.float32),
                                "transformer.single_transformer_blocks.0.attn.to_q.lora_B": np.ones((4, 2), np.float32)})
    return CheckpointContents(step=step, adapter=adapter, optimizer={"step": mx.array(step)},
                              iterator={"num_iterations": step}, loss=[{"step": step, "loss": 1.0, "time": 0.0}],
                              config={"examples": {"path": "/x", "images": []}})


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary(tmp_path, monkeypatch):
    first = write_checkpoint(tmp_path, small_contents(5), datetime.now())
    before = first.read_bytes()

    def broken_writestr(self, name, data, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", broken_writestr)
    with pytest.raises(OutputError) as caught:
        write_checkpoint(tmp_path, small_contents(5), datetime.now())
    assert "earlier checkpoints are intact" in str(caught.value)
    assert first.read_bytes() == before
    assert sorted(p.name for p in first.parent.iterdir()) == ["0000005_checkpoint.zip"]


def test_an_interrupted_write_removes_its_temporary(tmp_path, monkeypatch):
    def interrupted(self, name, data, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zipfile.ZipFile, "writestr", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, small_contents(1), datetime.now())
    assert list((tmp_path / "_checkpoints").iterdir()) == []


def test_temporaries_of_dead_runs_are_cleaned_but_not_live_ones(tmp_path):
    folder = tmp_path / "_checkpoints"
    folder.mkdir()
    dead = folder / ".0000003_checkpoint.zip.x1y2z3.partial"
    live = folder / ".0000004_checkpoint.zip.a1b2c3.partial"
    unrelated = folder / "notes.partial"
    for path in (dead, live, unrelated):
        path.write_bytes(b"half a zip")
    hour_ago = time.time() - 3600
    os.utime(dead, (hour_ago, hour_ago))
    os.utime(unrelated, (hour_ago, hour_ago))
    write_checkpoint(tmp_path, small_contents(5), datetime.now())
    assert not dead.exists() and live.exists() and unrelated.exists()
    assert remove_stale_partials(folder) == []


def test_the_loss_history_of_a_checkpoint_or_none_of_a_damaged_one(trained, tmp_path):
    # what the wizard's training screen shows of a resumed run's earlier steps
    folder, result = trained
    latest = folder / "out" / "_checkpoints" / "0000002_checkpoint.zip"
    history = read_loss_history(latest)
    assert [step for step, _ in history] == [1, 2]
    assert [loss for _, loss in history] == [entry["loss"] for entry in json.loads(members(latest)["0000002_loss.json"])]
    # members found by the manifest, as a resume finds them, not by a name pattern
    contents = members(latest)
    manifest = json.loads(contents["checkpoint.json"])
    contents["history.json"] = contents.pop(manifest["files"]["loss"])
    manifest["files"]["loss"] = "history.json"
    contents["checkpoint.json"] = json.dumps(manifest).encode()
    assert read_loss_history(rezip(tmp_path / "renamed.zip", contents)) == history
    (tmp_path / "broken.zip").write_bytes(latest.read_bytes()[:200])
    assert read_loss_history(tmp_path / "broken.zip") == []
    assert read_loss_history(tmp_path / "missing.zip") == []
