"""LoRA adapters on the linear layers of any MLX module tree.

y = base(x) + scale * (x @ A.T) @ B.T, with A (rank, in) and B (out, rank)
kept in float32: the orientation of every LoRA file format (FORMATS.md s.4),
so saving and loading never transposes.

Training wraps each target once (`apply_lora`). Generation may stack several
files on one layer: `LoRALinear.from_adapters` concatenates them into one
adapter (the sum of the products is exact), so a layer costs two matmuls
however many files are attached. A LoRALinear may also wrap another one
(a file attached on top of the adapter being trained, for previews).
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import NamedTuple

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from engine.errors import LoraFormatError, UserError
from engine.flux import speed
from engine.lora_fused import lora_linear, lora_linear_from_copies
from engine.lora_kernels import kernels_apply, lora_update

logger = logging.getLogger(__name__)

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)


class LoraDelta(NamedTuple):
    """One adapter on one layer: its contribution is scale * B @ A."""

    lora_A: mx.array  # (rank, in)
    lora_B: mx.array  # (out, rank)
    scale: float


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(input_dims, output_dims) of a Linear, QuantizedLinear or LoRALinear."""
    if isinstance(layer, LoRALinear):
        return layer.input_dims, layer.output_dims
    output_dims, input_dims = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        input_dims = input_dims * 32 // layer.bits  # packed into uint32 words
    return input_dims, output_dims


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    The LoRA path runs in the input's dtype, with A and B cast down from
    their float32 master copies. The delta is added to a base output that is
    already in that dtype, so computing it wider would buy no precision, and
    bf16 matmuls keep the tensor cores busy at full FLUX size. The float32
    masters (and the optimizer state on them) keep small updates from being
    rounded away. On CPU everything is float32 and the casts are no-ops.
    """

    def __init__(self, base: nn.Module, rank: int, key: mx.array, scale: float = 1.0):
        super().__init__()
        self.input_dims, self.output_dims = linear_dims(base)
        self.base = base
        if not isinstance(base, LoRALinear):  # a wrapped adapter may still be training
            base.freeze()
        # PEFT's default: kaiming_uniform_(a=sqrt(5)) reduces to U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / math.sqrt(self.input_dims)
        self.lora_A = mx.random.uniform(-bound, bound, (rank, self.input_dims), key=key)
        # B = 0: step 0 is exactly the base model
        self.lora_B = mx.zeros((self.output_dims, rank))
        self.scale = float(scale)

    @classmethod
    def from_adapters(cls, base: nn.Module, adapters: list[LoraDelta]) -> LoRALinear:
        """One layer carrying the sum of several adapters (generation)."""
        layer = cls(base, rank=1, key=mx.random.key(0))
        if len(adapters) == 1:
            (lora_A, lora_B, scale), = adapters
            layer.set_weights(lora_A, lora_B, scale)
            return layer
        # [s1 B1 | s2 B2] @ [A1; A2] = s1 B1 A1 + s2 B2 A2
        lora_A = mx.concatenate([a.lora_A.astype(mx.float32) for a in adapters], axis=0)
        lora_B = mx.concatenate([a.lora_B.astype(mx.float32) * a.scale for a in adapters], axis=1)
        layer.set_weights(lora_A, lora_B, 1.0)
        return layer

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def set_weights(self, lora_A: mx.array, lora_B: mx.array, scale: float | None = None) -> None:
        if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_A.shape[0] != lora_B.shape[1]:
            raise LoraFormatError(f"LoRA pair of shapes A {lora_A.shape}, B {lora_B.shape} is not (rank, in), (out, rank).")
        if lora_A.shape[1] != self.input_dims or lora_B.shape[0] != self.output_dims:
            raise LoraFormatError(
                f"LoRA of shape (in {lora_A.shape[1]}, out {lora_B.shape[0]}) does not fit a layer "
                f"of (in {self.input_dims}, out {self.output_dims})."
            )
        self.lora_A = lora_A.astype(mx.float32)
        self.lora_B = lora_B.astype(mx.float32)
        if scale is not None:
            self.scale = float(scale)

    def deltas(self) -> list[LoraDelta]:
        """Adapters from the outermost to the innermost wrapped layer."""
        inner = self.base.deltas() if isinstance(self.base, LoRALinear) else []
        return [LoraDelta(self.lora_A, self.lora_B, self.scale), *inner]

    def add_to(self, y: mx.array, x: mx.array) -> mx.array:
        """y + this adapter's product on x, y being the base's output on x made elsewhere (one product
        for several layers: engine/flux/fused_inputs.py). Autodiff takes its gradients, so it runs MLX's
        own products, never our kernels (engine/lora_kernels.py), which have no vjp of their own."""
        return self.add_from_low_rank(y, x @ self.lora_A.astype(x.dtype).T)

    def add_from_low_rank(self, y: mx.array, z: mx.array) -> mx.array:
        """y + this adapter's product, z = x @ lora_A.T being made elsewhere (`add_to`)."""
        lora_B = (self.lora_B if self.scale == 1.0 else self.lora_B * self.scale).astype(z.dtype).T
        if speed.LORA_ADDMM and y.dtype == z.dtype:
            return mx.addmm(y, z, lora_B)
        return y + (z @ lora_B).astype(y.dtype)

    def innermost(self) -> nn.Module:
        return self.base.innermost() if isinstance(self.base, LoRALinear) else self.base

    def _fused_operands(self, x: mx.array) -> tuple | None:
        """(quantized, weight arrays, bias) for lora_linear where the base is a plain or dequantizing
        linear in x's dtype, else None."""
        from engine.flux.quantized import DequantizingLinear

        base = self.base
        if not speed.LORA_FUSED_LINEAR or isinstance(base, LoRALinear):
            return None
        if isinstance(base, DequantizingLinear):
            if base["scales"].dtype != x.dtype or not base.takes_dense_route(x):
                return None
            quantized, weight = base.lora_operands(x)
        elif type(base) is nn.Linear and base.weight.dtype == x.dtype:
            quantized, weight = None, [base.weight]
        else:
            return None
        return quantized, weight, base.get("bias")

    def __call__(self, x: mx.array) -> mx.array:
        fused = self._fused_operands(x)
        if fused is not None:
            quantized, weight, bias = fused
            extra = [] if bias is None else [bias]
            if _use_compute_copies and "compute_A" in self and self["compute_A"].dtype == x.dtype:
                return lora_linear_from_copies(quantized, bias is not None, self.scale)(
                    x, self.lora_A, self.lora_B, self["compute_A"], self["compute_B"], *weight, *extra)
            return lora_linear(quantized, bias is not None, self.scale)(x, self.lora_A, self.lora_B, *weight, *extra)
        y = self.base(x)
        if y.dtype == x.dtype and kernels_apply(x.dtype, x.shape[-1], self.rank):
            return lora_update(y, x, self.lora_A, self.lora_B * self.scale)
        z = x @ self.lora_A.astype(x.dtype).T
        if self.scale != 1.0:  # a Python float: decided once when compiled
            z = z * self.scale
        lora_B = self.lora_B.astype(x.dtype).T
        if speed.LORA_ADDMM and y.dtype == x.dtype:
            return mx.addmm(y, z, lora_B)  # y + z @ B.T in one kernel
        return y + (z @ lora_B).astype(y.dtype)


_use_compute_copies = False  # set by `using_compute_copies` while a training step is traced


@contextmanager
def using_compute_copies():
    """Inside it (a training step's trace), LoRA layers that carry compute copies (`ComputeCopies`)
    read them instead of casting their float32 masters in every call. Outside it (previews,
    generation, tests) the masters are read, so a copy never stands in for a value it was not made
    from."""
    global _use_compute_copies
    before, _use_compute_copies = _use_compute_copies, True
    try:
        yield
    finally:
        _use_compute_copies = before


class ComputeCopies:
    """The compute copies of a model's adapters for one training step (speed.LORA_COMPUTE_COPIES).

    Each adapter of a training step gets two frozen arrays beside its float32 masters: compute_A = A
    and compute_B = scale * B, in the dtype the layer computes in. The step makes them inside its
    optimizer update (`refresh`, where they join the update's own kernels), so a step's stages read
    them as inputs instead of casting (and scaling) the masters in every forward and backward: 1260 of
    a checkpointed people step's kernels. On an H100 that bought 1.4% and raised the peak, so the step
    makes them only where speed.LORA_COMPUTE_COPIES is on (off by default; bench/NOTES.md item 42).
    `ensure_fresh`, before each step, remakes them wherever a master was replaced since (a resume,
    a loaded LoRA): it holds the master arrays each copy was made from and compares identities."""

    def __init__(self, model: nn.Module, dtype: mx.Dtype):
        self.dtype = dtype
        self.layers = [layer for layer in lora_layers(model).values() if not isinstance(layer.base, LoRALinear)]
        for layer in self.layers:
            self._make(layer)
            layer.freeze(keys=["compute_A", "compute_B"], recurse=False)
        mx.eval([[layer["compute_A"], layer["compute_B"]] for layer in self.layers])
        self.mark_fresh()

    def _make(self, layer: LoRALinear) -> None:
        layer.compute_A = layer.lora_A.astype(self.dtype)
        layer.compute_B = (layer.lora_B * layer.scale).astype(self.dtype)

    def refresh(self) -> None:
        """Remake every copy from the current masters (traced inside the compiled optimizer update)."""
        for layer in self.layers:
            self._make(layer)

    def mark_fresh(self) -> None:
        """Record the masters the copies were just made from (call after the update has run its trace)."""
        self._sources = [(layer.lora_A, layer.lora_B, layer.scale) for layer in self.layers]

    def stale(self) -> list[LoRALinear]:
        return [layer for layer, (a, b, scale) in zip(self.layers, self._sources)
                if layer.lora_A is not a or layer.lora_B is not b or layer.scale != scale
                or layer.get("compute_A") is None or layer["compute_A"].dtype != self.dtype]

    def ensure_fresh(self) -> int:
        """Remake the copies of adapters whose masters changed outside the step; returns how many."""
        stale = self.stale()
        for layer in stale:
            self._make(layer)
        if stale:
            mx.eval([[layer["compute_A"], layer["compute_B"]] for layer in stale])
            self.mark_fresh()
        return len(stale)


def node_at(model: nn.Module | dict, path: str):
    """What sits at a dotted path in a module, or in a tree of dicts and lists (an optimizer's state),
    or None. Lists (to_out, ff.net) are not modules, so the walk returns them too."""
    node = model
    for part in path.split(".") if path else []:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def get_module(model: nn.Module, path: str) -> nn.Module | None:
    """The module at a dotted path ("transformer_blocks.0.attn.to_out.0"), or None."""
    node = node_at(model, path)
    return node if isinstance(node, nn.Module) else None


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = node_at(model, parent_path)
    if isinstance(parent, list):
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def apply_lora(model: nn.Module, targets: list[tuple[str, int]], key: mx.array) -> list[str]:
    """Wrap each (path, rank) target in a LoRALinear; freeze everything else.

    All targets are checked before any is wrapped, so a bad one leaves the
    model untouched. Each target draws its A from its own split of `key`.
    """
    seen = set()
    for path, rank in targets:
        layer = get_module(model, path)
        if layer is None:
            raise UserError(f"LoRA target '{path}' does not exist in the model.",
                            hint="Check lora_layers: block indices and layer_types.")
        if isinstance(layer, LoRALinear):
            raise UserError(f"LoRA target '{path}' already has a LoRA adapter.")
        if not isinstance(layer, LINEAR_TYPES):
            raise UserError(f"LoRA target '{path}' is a {type(layer).__name__}, not a linear layer.",
                            hint="LoRA applies to linear layers only (e.g. attn.to_q, ff.net.0.proj).")
        if not isinstance(rank, int) or rank < 1:
            raise UserError(f"LoRA rank for '{path}' must be a positive integer, got {rank!r}.")
        if path in seen:
            raise UserError(f"LoRA target '{path}' is listed twice.")
        seen.add(path)

    model.freeze()
    keys = mx.random.split(key, max(len(targets), 1))
    wrapped = []
    for (path, rank), layer_key in zip(targets, keys):
        lora = LoRALinear(get_module(model, path), rank, key=layer_key)
        lora.unfreeze(keys=["lora_A", "lora_B"], recurse=False)
        set_module(model, path, lora)
        wrapped.append(path)
    logger.debug("LoRA on %d layers", len(wrapped))
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Outermost LoRALinear of each wrapped layer, by module path."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            found[path] = module
    # a LoRALinear nested in another one shows up as "<path>.base"
    return {p: m for p, m in found.items() if not (p.endswith(".base") and p[: -len(".base")] in found)}


def lora_deltas(model: nn.Module) -> dict[str, list[LoraDelta]]:
    """Every adapter of the model by layer path, stacked ones included."""
    return {path: layer.deltas() for path, layer in sorted(lora_layers(model).items())}


def lora_parameters(model: nn.Module) -> dict[str, mx.array]:
    """Flat {"<path>.lora_A": A, "<path>.lora_B": B}: what a checkpoint stores."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_A", ".lora_B"))}


def load_lora_parameters(model: nn.Module, flat: dict[str, mx.array]) -> None:
    """Put saved A/B values back into the model's adapters (resume).

    The keys and shapes must be exactly those of `lora_parameters(model)`.
    """
    current = lora_parameters(model)
    missing = sorted(set(current) - set(flat))
    unexpected = sorted(set(flat) - set(current))
    if missing or unexpected:
        raise LoraFormatError(
            "The saved LoRA does not match the model's adapters"
            + (f"; missing: {', '.join(missing[:5])}" if missing else "")
            + (f"; unexpected: {', '.join(unexpected[:5])}" if unexpected else "")
            + ".",
            hint="Resume with the same lora_layers as the run that saved it.",
        )
    for name, value in flat.items():
        if tuple(value.shape) != tuple(current[name].shape):
            raise LoraFormatError(f"Saved LoRA '{name}' has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(current[name].shape)}.",
                                  hint="Resume with the same lora_layers and ranks.")
    for name, value in flat.items():
        path, _, which = name.rpartition(".")
        setattr(get_module(model, path), which, value.astype(mx.float32))


def remove_lora(model: nn.Module) -> list[str]:
    """Put the original layers back; returns the paths that had adapters."""
    layers = lora_layers(model)
    for path, layer in layers.items():
        set_module(model, path, layer.innermost())
    return sorted(layers)


def fuse_lora(model: nn.Module, dequantize: bool = False) -> list[str]:
    """Merge adapters into their base weights, so generation runs plain linears.

    A quantized base is left unfused (its LoRALinear stays) unless
    `dequantize`: re-quantizing would round the small delta away, so fusing
    means a dense, larger layer, which must be asked for.
    """
    fused = []
    for path, layer in sorted(lora_layers(model).items()):
        base = layer.innermost()
        if isinstance(base, nn.QuantizedLinear):
            if not dequantize:
                continue
            weight = mx.dequantize(base.weight, base.scales, base.get("biases"), base.group_size,
                                   base.bits, mode=getattr(base, "mode", "affine"))
        else:
            weight = base.weight
        delta = sum(d.scale * (d.lora_B @ d.lora_A) for d in layer.deltas())
        dense = nn.Linear(layer.input_dims, layer.output_dims, bias="bias" in base)
        dense.weight = (weight.astype(mx.float32) + delta).astype(weight.dtype)
        if "bias" in base:
            dense.bias = base.bias
        dense.freeze()
        set_module(model, path, dense)
        fused.append(path)
    return fused
