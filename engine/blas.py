"""Make MLX's CPU backend use a fast system BLAS when one is installed.

MLX's Linux CPU wheel bundles the reference BLAS: a float32 1024^3 matmul runs
at ~3 GFLOP/s. Loading a system OpenBLAS with RTLD_GLOBAL *before* mlx is first
imported makes MLX's cblas calls resolve to it (~40x faster, same results).
This must run before `import mlx.core`; `engine/__init__.py` calls it first.
"""
from __future__ import annotations

import ctypes
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

loaded_blas: str | None = None


def preload_system_blas() -> str | None:
    """Load the first system OpenBLAS found; return its path (None if none or not Linux).

    `DREAMBOOTH_WIZARD_BLAS` names another library, or `none` to skip.
    """
    global loaded_blas
    if loaded_blas is not None or not sys.platform.startswith("linux"):
        return loaded_blas
    if "mlx.core" in sys.modules:  # too late: MLX has bound its BLAS already
        return None
    wanted = os.environ.get("DREAMBOOTH_WIZARD_BLAS")
    if wanted and wanted.lower() == "none":
        return None
    for path in ((wanted,) if wanted else CANDIDATES):
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded_blas = path
            return path
    return None
