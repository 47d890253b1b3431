"""dreambooth-wizard's headless engine: FLUX.1 in MLX, LoRA training, formats.

Never imports the UI. The system BLAS is preloaded here, before anything can
import mlx, so CPU float32 work is fast (see engine/blas.py), and MLX's compiled
CUDA kernels are kept in our cache folder (engine/paths.py).
"""
from engine.blas import preload_system_blas
from engine.paths import keep_compiled_gpu_kernels

preload_system_blas()
keep_compiled_gpu_kernels()

__all__ = ["load_model"]


def __getattr__(name: str):
    # heavy imports happen late, so `dreambooth-wizard --help` answers instantly
    if name == "load_model":
        from engine.flux.loading import load_model

        return load_model
    raise AttributeError(name)
