"""dreambooth-wizard's headless engine: FLUX.1 in MLX, LoRA training, formats.

Never imports the UI. The system BLAS is preloaded here, before anything can
import mlx, so CPU float32 work is fast (see engine/blas.py).
"""
from engine.blas import preload_system_blas

preload_system_blas()

__all__ = ["load_model"]


def __getattr__(name: str):
    # heavy imports happen late, so `dreambooth-wizard --help` answers instantly
    if name == "load_model":
        from engine.flux.loading import load_model

        return load_model
    raise AttributeError(name)
