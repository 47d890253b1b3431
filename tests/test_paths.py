import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

import mlx.core as mx

from engine import paths
from engine.errors import OutputError


def test_gpu_kernels_are_kept_in_our_cache_per_mlx_version(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_WIZARD_HOME", str(tmp_path))
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    folder = paths.keep_compiled_gpu_kernels(mx.__version__)
    assert folder == str(tmp_path / "cache" / "mlx-cuda-kernels" / mx.__version__)
    assert os.environ["MLX_PTX_CACHE_DIR"] == folder
    assert not (tmp_path / "cache").exists()  # MLX creates it when it first compiles a kernel
    # a folder the user chose stays theirs
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", "/somewhere/else")
    assert paths.keep_compiled_gpu_kernels(mx.__version__) == "/somewhere/else"


def test_loading_a_model_on_cuda_keeps_the_kernels_before_any_compiles(monkeypatch):
    from engine.flux import loading, speed

    class Called(Exception):
        pass

    def spy(version):
        raise Called(version)

    monkeypatch.setattr(loading, "keep_compiled_gpu_kernels", spy)
    monkeypatch.setattr(speed, "on_cuda", lambda: True)
    try:
        loading.load_model("tiny")
    except Called as called:
        assert called.args == (mx.__version__,)
    else:
        raise AssertionError("load_model did not point MLX's kernel cache into ours")


def test_small_cuda_graphs_are_set_for_one_stage_at_a_time_on_cuda_only_and_never_over_the_users(monkeypatch):
    # MLX reads this once, at its first kernel launch (engine/flux/speed.py: configure_cuda_graphs)
    from engine.flux import speed

    monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", "recorded")  # so the end of the test restores what was there
    monkeypatch.delenv("MLX_MAX_OPS_PER_BUFFER")
    monkeypatch.setattr(speed, "on_cuda", lambda: False)
    assert speed.configure_cuda_graphs(one_stage_at_a_time=True) == {}  # Metal reads it too
    assert "MLX_MAX_OPS_PER_BUFFER" not in os.environ

    monkeypatch.setattr(speed, "on_cuda", lambda: True)
    assert speed.configure_cuda_graphs(one_stage_at_a_time=False) == {}  # MLX's own 20 a graph at depth >= 1
    assert "MLX_MAX_OPS_PER_BUFFER" not in os.environ
    assert speed.configure_cuda_graphs(one_stage_at_a_time=True) == {
        "MLX_MAX_OPS_PER_BUFFER": str(speed.CUDA_OPS_PER_GRAPH_ONE_STAGE)}
    assert int(os.environ["MLX_MAX_OPS_PER_BUFFER"]) < 20
    monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", "40")  # the user's own setting stays
    assert speed.configure_cuda_graphs(one_stage_at_a_time=True) == {}
    assert os.environ["MLX_MAX_OPS_PER_BUFFER"] == "40"
    # without a bound by stages (depth -1): small graphs cut by kernels and by bytes, and a graph cache that
    # holds them, each where unset
    for name in ("MLX_CUDA_GRAPH_CACHE_SIZE", "MLX_MAX_MB_PER_BUFFER"):
        monkeypatch.setenv(name, "recorded")
        monkeypatch.delenv(name)
    assert speed.configure_cuda_graphs(unbounded=True) == {
        "MLX_MAX_MB_PER_BUFFER": str(speed.CUDA_MB_PER_GRAPH_UNBOUNDED),
        "MLX_CUDA_GRAPH_CACHE_SIZE": str(speed.CUDA_GRAPH_CACHE_UNBOUNDED)}
    assert os.environ["MLX_MAX_OPS_PER_BUFFER"] == "40"
    for name in ("MLX_MAX_OPS_PER_BUFFER", "MLX_CUDA_GRAPH_CACHE_SIZE", "MLX_MAX_MB_PER_BUFFER"):
        monkeypatch.delenv(name)
    assert speed.configure_cuda_graphs(unbounded=True) == {
        "MLX_MAX_OPS_PER_BUFFER": str(speed.CUDA_OPS_PER_GRAPH_UNBOUNDED),
        "MLX_MAX_MB_PER_BUFFER": str(speed.CUDA_MB_PER_GRAPH_UNBOUNDED),
        "MLX_CUDA_GRAPH_CACHE_SIZE": str(speed.CUDA_GRAPH_CACHE_UNBOUNDED)}
    assert int(os.environ["MLX_MAX_OPS_PER_BUFFER"]) < 20  # still small graphs: MLX's own size held 24.5 GiB


def test_the_depth_from_the_environment_takes_whole_numbers_and_warns_otherwise(monkeypatch):
    from engine.flux import speed

    for text, depth in (("-1", -1), (" 2 ", 2), ("", 1)):
        monkeypatch.setenv("DREAMBOOTH_WIZARD_BLOCKWISE_DEPTH", text)
        assert speed._depth_from_environment(1) == depth
    for text in ("deep", "-2", "1.5"):
        monkeypatch.setenv("DREAMBOOTH_WIZARD_BLOCKWISE_DEPTH", text)
        with pytest.warns(UserWarning, match="DREAMBOOTH_WIZARD_BLOCKWISE_DEPTH"):
            assert speed._depth_from_environment(1) == 1


# ---------------------------------------------------------------- atomic writes


def usual_mode() -> int:
    """What any new file gets under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def a_small_lora() -> dict:
    from engine.flux.loading import load_model
    from engine.lora import apply_lora, lora_parameters

    transformer = load_model("tiny", text_encoders=False).transformer
    apply_lora(transformer, [("single_transformer_blocks.0.proj_out", 4)], key=mx.random.key(0))
    return lora_parameters(transformer)


def test_atomic_write_gives_a_whole_file_the_usual_permissions(tmp_path):
    target = tmp_path / "new" / "adapter.safetensors"
    with paths.atomic_write(target) as temporary:
        assert temporary.parent == target.parent and not target.exists()
        temporary.write_bytes(b"first")
    assert target.read_bytes() == b"first"
    assert paths.new_file_mode() == usual_mode() and mode_of(target) == usual_mode()  # not mkstemp's 0600
    with paths.atomic_write(target) as temporary:
        temporary.write_bytes(b"second")
    assert target.read_bytes() == b"second" and mode_of(target) == usual_mode()
    assert temporaries(target.parent) == []


def test_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("the old one")
    with pytest.raises(RuntimeError):
        with paths.atomic_write(target) as temporary:
            temporary.write_text("half of the new")
            raise RuntimeError("the writer failed")
    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError):  # the rename fails: a folder has the name
        with paths.atomic_write(tmp_path / "taken") as temporary:
            temporary.write_text("never placed")
    assert target.read_text() == "the old one" and list((tmp_path / "taken").iterdir()) == []
    assert temporaries(tmp_path) == []


def test_atomic_write_flushes_the_file_and_its_rename_only_when_asked(tmp_path, monkeypatch):
    flushed = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda descriptor: flushed.append(os.fstat(descriptor).st_ino)
                        or real_fsync(descriptor))
    with paths.atomic_write(tmp_path / "a.zip", suffix=".partial", fsync=True) as temporary:
        assert temporary.name.startswith(".a.zip.") and temporary.name.endswith(".partial")  # checkpoint.py's names
        temporary.write_bytes(b"zip")
    assert flushed == [(tmp_path / "a.zip").stat().st_ino, tmp_path.stat().st_ino]  # the file, then its rename
    with paths.atomic_write(tmp_path / "b.json") as temporary:
        temporary.write_bytes(b"{}")
    assert len(flushed) == 2


def test_files_a_user_keeps_get_the_usual_permissions(tmp_path):
    # a ComfyUI service account must be able to read the LoRA; mkstemp alone makes 0600 files
    from engine.config import load_config, save_config
    from engine.instrumentation import write_loss_history
    from engine.lora_formats import save_mflux
    from tests.helpers import make_training_folder

    save_mflux(str(tmp_path / "adapter.safetensors"), a_small_lora())
    png = write_loss_history(tmp_path / "out", 2, [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}])
    config = save_config(load_config(make_training_folder(tmp_path / "run", count=1)), tmp_path / "saved.json")
    for path in (tmp_path / "adapter.safetensors", png, png.with_suffix(".json"), config):
        assert mode_of(path) == usual_mode(), path
    assert temporaries(tmp_path) == [] and temporaries(png.parent) == []


def test_a_lora_file_that_cannot_be_written_is_one_message_and_no_temporary(tmp_path):
    from engine.lora_formats import save_mflux

    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError) as raised:
        save_mflux(str(tmp_path / "taken"), a_small_lora())
    assert "cannot write the LoRA file" in str(raised.value) and "\n  -> " in str(raised.value)
    assert temporaries(tmp_path) == []


def test_config_writers_leave_no_temporary_when_the_name_is_taken_by_a_folder(tmp_path):
    from engine.config import load_config, save_config
    from tests.helpers import make_training_folder
    from tui.screens.review import ReviewScreen

    cfg = load_config(make_training_folder(tmp_path / "run", count=1))
    (tmp_path / "taken.json").mkdir()
    with pytest.raises(IsADirectoryError):
        save_config(cfg, tmp_path / "taken.json")
    assert temporaries(tmp_path) == []
    # the review screen's own save (reached unchecked only on a back step): not saved, and nothing left behind
    state = SimpleNamespace(config_path=None, output_dir=None)
    screen = SimpleNamespace(paths=lambda: (tmp_path / "taken.json", tmp_path / "out"),
                             config_data=lambda: ({"model": "tiny"}, ""), app=SimpleNamespace(state=state))
    ReviewScreen.commit(screen)
    assert state.config_path is None and temporaries(tmp_path) == []
    screen.paths = lambda: (tmp_path / "review.json", tmp_path / "out")
    ReviewScreen.commit(screen)
    assert state.config_path == tmp_path / "review.json" and json.loads(state.config_path.read_text()) == {"model": "tiny"}
    assert mode_of(state.config_path) == usual_mode()


# ---------------------------------------------------------------- output folders


def test_an_output_file_must_be_named_and_not_a_folder(tmp_path):
    assert paths.output_file(tmp_path / "a.png", "image.png", "image file") == tmp_path / "a.png"
    assert paths.output_file("~/x.safetensors", "lora.safetensors", "LoRA file") == Path.home() / "x.safetensors"
    with pytest.raises(OutputError, match="-o is empty") as empty:
        paths.output_file("  ", "image.png", "image file")
    assert "name the image file to write, e.g. -o image.png" in str(empty.value.hint)
    for folder in (tmp_path, f"{tmp_path / 'new'}/"):
        with pytest.raises(OutputError, match="is a folder; -o names the LoRA file to write") as error:
            paths.output_file(folder, "lora.safetensors", "LoRA file")
        assert str(Path(folder) / "lora.safetensors") in str(error.value.hint)
    assert not (tmp_path / "new").exists()


def test_a_file_in_the_way_of_the_output_folder_is_named(tmp_path):
    blocker = tmp_path / "photo.png"
    blocker.write_bytes(b"not a folder")
    assert paths.unwritable_reason(blocker) == "it is a file, not a folder"
    assert paths.unwritable_reason(blocker / "out" / "deeper") == f"{blocker.name} is a file, not a folder"
    for output in (blocker, blocker / "out"):
        with pytest.raises(OutputError, match="set save.output_path"):
            paths.prepare_output_folder(output, fresh=True)
    assert blocker.read_bytes() == b"not a folder"


def test_a_fresh_run_goes_beside_an_earlier_one_and_a_resumed_run_into_it(tmp_path):
    output = tmp_path / "out"
    assert paths.prepare_output_folder(output, fresh=True) == output and output.is_dir()
    assert paths.prepare_output_folder(output, fresh=True) == output  # still empty
    (output / "adapter.safetensors").write_bytes(b"an earlier run")
    beside = paths.prepare_output_folder(output, fresh=True)
    assert beside.parent == tmp_path and beside.name.startswith("out_") and beside.is_dir()
    assert paths.prepare_output_folder(output, fresh=False) == output
