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
