"""Where the engine keeps its own files: the tiny model, encoding caches, logs.

`DREAMBOOTH_WIZARD_HOME` overrides the platform folders (tests use it so they
never touch the user's home).
"""
from __future__ import annotations

import os
from pathlib import Path


def _folder(kind: str, create: bool = True) -> Path:
    home = os.environ.get("DREAMBOOTH_WIZARD_HOME")
    if home:
        path = Path(home).expanduser() / kind
    else:
        import platformdirs

        find = {"cache": platformdirs.user_cache_dir, "logs": platformdirs.user_log_dir}[kind]
        path = Path(find("dreambooth-wizard"))
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    return _folder("cache")


def log_dir() -> Path:
    return _folder("logs")


def keep_compiled_gpu_kernels(mlx_version: str) -> str:
    """Point MLX's CUDA kernel cache into our cache folder, per MLX version; returns the folder.

    MLX compiles its CUDA kernels on first use and keeps them in /tmp/mlx/<version>/ptx, which a
    reboot empties: then a first training step spends minutes compiling again (bench/NOTES.md).
    Must run before MLX compiles its first kernel (load_model calls it on CUDA); MLX creates the
    folder. A folder the user set (MLX_PTX_CACHE_DIR) is kept."""
    if os.environ.get("MLX_PTX_CACHE_DIR"):
        return os.environ["MLX_PTX_CACHE_DIR"]
    folder = str(_folder("cache", create=False) / "mlx-cuda-kernels" / mlx_version)
    os.environ["MLX_PTX_CACHE_DIR"] = folder
    return folder


def unwritable_reason(folder: Path) -> str | None:
    """Why `folder` cannot be written to (it is created if missing, then probed), or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".dreambooth-wizard-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        return error.strerror or str(error)
    return None
