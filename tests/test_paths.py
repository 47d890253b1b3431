import os

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


def test_cuda_graph_settings_are_set_on_cuda_only_and_never_over_the_users(monkeypatch):
    # MLX reads these once, at its first kernel launch (engine/flux/speed.py: configure_cuda_graphs)
    from engine.flux import speed

    for name in ("MLX_CUDA_GRAPH_CACHE_SIZE", "MLX_MAX_OPS_PER_BUFFER"):
        monkeypatch.setenv(name, "recorded")  # so the end of the test restores what was there before
        monkeypatch.delenv(name)
    monkeypatch.setattr(speed, "on_cuda", lambda: False)
    assert speed.configure_cuda_graphs(one_stage_at_a_time=True) == {}  # Metal reads MLX_MAX_OPS_PER_BUFFER too
    assert "MLX_MAX_OPS_PER_BUFFER" not in os.environ and "MLX_CUDA_GRAPH_CACHE_SIZE" not in os.environ

    monkeypatch.setattr(speed, "on_cuda", lambda: True)
    assert speed.configure_cuda_graphs() == {"MLX_CUDA_GRAPH_CACHE_SIZE": str(speed.CUDA_GRAPH_CACHE_SIZE)}
    assert "MLX_MAX_OPS_PER_BUFFER" not in os.environ  # MLX's own 20 a graph at depth >= 1
    assert int(os.environ["MLX_CUDA_GRAPH_CACHE_SIZE"]) > 100  # MLX's default, which a whole step overflows
    monkeypatch.delenv("MLX_CUDA_GRAPH_CACHE_SIZE")
    # one stage at a time: small graphs, MLX's own cache (the large one made depth 0 slower)
    assert speed.configure_cuda_graphs(one_stage_at_a_time=True) == {
        "MLX_MAX_OPS_PER_BUFFER": str(speed.CUDA_OPS_PER_GRAPH_ONE_STAGE), "MLX_CUDA_GRAPH_CACHE_SIZE": "100"}
    assert int(os.environ["MLX_MAX_OPS_PER_BUFFER"]) < 20
    assert speed.configure_cuda_graphs() == {}  # load_model's later call keeps them
    assert os.environ["MLX_CUDA_GRAPH_CACHE_SIZE"] == "100"
    monkeypatch.delenv("MLX_CUDA_GRAPH_CACHE_SIZE")
    monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", "40")  # the user's own setting stays
    assert speed.configure_cuda_graphs(one_stage_at_a_time=True) == {"MLX_CUDA_GRAPH_CACHE_SIZE": "100"}
    assert os.environ["MLX_MAX_OPS_PER_BUFFER"] == "40"


def test_loading_a_model_on_cuda_settles_the_cuda_graph_settings(monkeypatch):
    from engine.flux import loading, speed

    calls = []
    monkeypatch.setattr(loading, "keep_compiled_gpu_kernels", lambda version: None)
    monkeypatch.setattr(speed, "configure_cuda_graphs", lambda **kwargs: calls.append(kwargs) or {})
    monkeypatch.setattr(speed, "on_cuda", lambda: True)
    loading.load_model("tiny", transformer=False)
    assert calls == [{}]
