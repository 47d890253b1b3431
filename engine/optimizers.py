"""Optimizers by name: mflux's Adam and AdamW plus the others MLX offers."""
from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

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


def state_mismatch(optimizer, state: dict) -> str | None:
    """Why `state` cannot be this (initialised) optimizer's state, or None: what it keeps per weight, and shapes."""
    expected, saved = _kept_per_weight(optimizer.state), _kept_per_weight(state)
    name = type(optimizer).__name__
    for weight, kept in expected.items():
        found = saved.get(weight)
        if found is None:  # a weight without saved state starts afresh, as MLX's init makes it
            continue
        if set(found) != set(kept):
            return (f"it keeps {', '.join(sorted(found))} for each weight, the state of {_keepers(set(found))}, "
                    f"but the config names {name}, which keeps {', '.join(sorted(kept)) or 'nothing'}")
        for part, shape in kept.items():
            if found[part] != shape:
                return f"its {part} of {weight} has shape {found[part]}, {name} here needs {shape}"
    return None


def _kept_per_weight(state) -> dict[str, dict[str, tuple[int, ...]]]:
    """{"blocks.0.lora_A": {"m": shape, "v": shape}}; the step and learning rate at the top are left out."""
    kept: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, value in tree_flatten(state):
        weight, _, part = key.rpartition(".")
        if weight and isinstance(value, mx.array):
            kept.setdefault(weight, {})[part] = tuple(value.shape)
    return kept


def _keepers(parts: set[str]) -> str:
    """The optimizers that keep exactly these parts for a LoRA matrix ("Adam, AdamW or Adamax")."""
    names = []
    for name, make in OPTIMIZERS.items():
        optimizer = make(1e-3)
        optimizer.init({"w": mx.zeros((2, 2))})
        if set(optimizer.state["w"]) == parts:
            names.append(name)
    if not names:
        return "an optimizer this program does not know"
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
