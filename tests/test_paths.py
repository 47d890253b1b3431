import os

import pytest

import mlx.core as mx

from engine import paths


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
    # without a bound by stages (depth -1): small graphs and a graph cache that holds them, each where unset
    monkeypatch.setenv("MLX_CUDA_GRAPH_CACHE_SIZE", "recorded")
    monkeypatch.delenv("MLX_CUDA_GRAPH_CACHE_SIZE")
    assert speed.configure_cuda_graphs(unbounded=True) == {"MLX_CUDA_GRAPH_CACHE_SIZE": str(speed.CUDA_GRAPH_CACHE_UNBOUNDED)}
    monkeypatch.delenv("MLX_MAX_OPS_PER_BUFFER")
    monkeypatch.delenv("MLX_CUDA_GRAPH_CACHE_SIZE")
    assert speed.configure_cuda_graphs(unbounded=True) == {
        "MLX_MAX_OPS_PER_BUFFER": str(speed.CUDA_OPS_PER_GRAPH_UNBOUNDED),
        "MLX_CUDA_GRAPH_CACHE_SIZE": str(speed.CUDA_GRAPH_CACHE_UNBOUNDED)}


def test_the_depth_from_the_environment_takes_whole_numbers_and_warns_otherwise(monkeypatch):
    from engine.flux import speed

    for text, depth in (("-1", -1), (" 2 ", 2), ("", 1)):
        monkeypatch.setenv("DREAMBOOTH_WIZARD_BLOCKWISE_DEPTH", text)
        assert speed._depth_from_environment(1) == depth
    for text in ("deep", "-2", "1.5"):
        monkeypatch.setenv("DREAMBOOTH_WIZARD_BLOCKWISE_DEPTH", text)
        with pytest.warns(UserWarning, match="DREAMBOOTH_WIZARD_BLOCKWISE_DEPTH"):
            assert speed._depth_from_environment(1) == 1
