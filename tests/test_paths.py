import os
from importlib.metadata import version

from engine import paths


def test_gpu_kernels_are_kept_in_our_cache_per_mlx_version(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_WIZARD_HOME", str(tmp_path))
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    folder = paths.keep_compiled_gpu_kernels()
    assert folder == str(tmp_path / "cache" / "mlx-cuda-kernels" / version("mlx"))
    assert os.environ["MLX_PTX_CACHE_DIR"] == folder
    assert not (tmp_path / "cache").exists()  # MLX creates it when it first compiles a kernel
    # a folder the user chose stays theirs
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", "/somewhere/else")
    assert paths.keep_compiled_gpu_kernels() == "/somewhere/else"
