"""Optimizers by name: mflux's Adam and AdamW plus the others MLX offers."""
from __future__ import annotations

import mlx.optimizers as optim

from engine.config import canonical_optimizer
from engine.errors import ConfigError

# canonical name -> constructor taking the learning rate
OPTIMIZERS = {
    "Adam": lambda lr: optim.Adam(learning_rate=lr),
    "AdamW": lambda lr: optim.AdamW(learning_rate=lr),
    "SGD": lambda lr: optim.SGD(learning_rate=lr),
    "RMSprop": lambda lr: optim.RMSprop(learning_rate=lr),
    "Adagrad": lambda lr: optim.Adagrad(learning_rate=lr),
    "AdaDelta": lambda lr: optim.AdaDelta(learning_rate=lr),
    "Adamax": lambda lr: optim.Adamax(learning_rate=lr),
    "Lion": lambda lr: optim.Lion(learning_rate=lr),
    "Adafactor": lambda lr: optim.Adafactor(learning_rate=lr, relative_step=False, scale_parameter=False),
}
if hasattr(optim, "Muon"):
    OPTIMIZERS["Muon"] = lambda lr: optim.Muon(learning_rate=lr)


def build_optimizer(name: str, learning_rate: float):
    canonical = canonical_optimizer(str(name))
    if canonical not in OPTIMIZERS:  # unknown, or not in this MLX (Muon is recent)
        raise ConfigError([f"optimizer.name = {name!r}: unknown optimizer, use one of {', '.join(OPTIMIZERS)}"])
    return OPTIMIZERS[canonical](float(learning_rate))
