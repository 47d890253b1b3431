"""LoRA files in, LoRA files out: mflux, diffusers/PEFT and kohya (FORMATS.md s.4).

Reading maps every key to one of our layers (diffusers module paths) as a
list of LoraDelta(A, B, scale); kohya files with BFL names have fused layers
(q, k, v and the MLP in one `linear1`), which are split exactly: each part
keeps the shared down matrix and its rows of the up matrix. Writing stacks
them back (concatenated down, block-diagonal up), again exactly.

Every file we write bakes its scale into B and carries scale 1 (no alpha,
or alpha = rank for kohya), which every loader reads the same way.

This module reads; the writers are in engine/lora_writers.py and the formats'
names for FLUX's layers in engine/lora_names.py (both re-exported here).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx import nn

from engine.errors import LoraFormatError
from engine.lora import (
    LINEAR_TYPES,
    LoraDelta,
    LoRALinear,
    get_module,
    linear_dims,
    set_module,
)
from engine.lora_names import (
    BFL_GLOBAL,
    BFL_JOINT,
    BFL_ROOTS,
    BFL_SINGLE,
    DOTTED_PREFIXES,
    GLOBAL_LAYERS,
    JOINT_BLOCK_LAYERS,
    MFLUX_NAMES,
    SD_MARKERS,
    SINGLE_BLOCK_LAYERS,
    SUFFIXES,
    SWAPPED_HALVES,
    TEXT_ENCODER_PREFIXES,
)
from engine.lora_writers import save_diffusers, save_kohya, save_mflux

logger = logging.getLogger(__name__)

# reading lives here; the names and the writers have their own modules, re-exported as one API
__all__ = [
    "AttachReport", "GLOBAL_LAYERS", "JOINT_BLOCK_LAYERS", "LoraFile", "MFLUX_NAMES", "SINGLE_BLOCK_LAYERS",
    "attach_lora_files", "load_lora_file", "save_diffusers", "save_kohya", "save_mflux",
]

@dataclass
class LoraFile:
    """A LoRA file read into our layer names."""

    path: str
    format: str  # "mflux", "diffusers" or "kohya"
    naming: str  # "diffusers" (our paths) or "bfl" (fused BFL layers)
    adapters: dict[str, list[LoraDelta]]
    unmatched_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class AttachReport:
    """What attach_lora_files did, for the UI to show."""

    files: list[LoraFile]
    layers: list[str]  # layers that now carry adapters

    @property
    def unmatched_keys(self) -> dict[str, list[str]]:
        return {f.path: f.unmatched_keys for f in self.files if f.unmatched_keys}


# ---------------------------------------------------------------- reading


def load_lora_file(path: str, model: nn.Module | None = None) -> LoraFile:
    """Read any supported LoRA file; with `model`, also check it fits.

    Keys for layers the model lacks are reported, not fatal; a file for
    another architecture (SD, SDXL, shapes that do not fit) raises
    LoraFormatError.
    """
    tensors, metadata = _read_safetensors(path)
    groups, unmatched, formats = _group_keys(tensors)
    peft_config = _peft_config(metadata)
    adapters, sources = {}, {}
    naming = "diffusers"
    for (kind, name), parts in groups.items():
        if "A" not in parts or "B" not in parts:
            unmatched.extend(parts.get("keys", []))
            continue
        resolved = _resolve(kind, name, parts, peft_config, model)
        if resolved is None:
            unmatched.extend(parts["keys"])
            continue
        naming = "bfl" if kind == "bfl" else naming
        for module_path, delta in resolved:
            adapters.setdefault(module_path, []).append(delta)
            sources.setdefault(module_path, []).extend(parts["keys"])
    if not adapters:
        raise LoraFormatError(_not_flux_message(path, list(tensors)),
                              hint="Use a LoRA trained for FLUX.1 (dev or schnell).")
    if model is not None:
        _check_fits(path, adapters, sources, unmatched, model)
    if not adapters:
        raise LoraFormatError(f"{path}: no layer of this LoRA exists in the model.",
                              hint="Is it a FLUX.1 LoRA? Its keys look like: " + ", ".join(sorted(tensors)[:3]))
    unmatched = sorted(set(unmatched))
    if unmatched:
        logger.warning("%s: %d key(s) match no layer of the model and are ignored, e.g. %s",
                       path, len(unmatched), ", ".join(unmatched[:3]))
    file_format = "kohya" if "kohya" in formats else "diffusers" if "diffusers" in formats else "mflux"
    return LoraFile(path, file_format, naming, adapters, unmatched, metadata)


def attach_lora_files(model: nn.Module, files: list[tuple[str, float]]) -> AttachReport:
    """Attach several LoRA files for generation, each with the user's scale.

    All files are read and checked before the model changes. Each layer gets
    one LoRALinear carrying the sum of every file's delta on it.
    """
    loaded = [(load_lora_file(path, model), float(user_scale)) for path, user_scale in files]
    per_layer: dict[str, list[LoraDelta]] = {}
    for lora_file, user_scale in loaded:
        for module_path, deltas in lora_file.adapters.items():
            for d in deltas:
                per_layer.setdefault(module_path, []).append(LoraDelta(d.lora_A, d.lora_B, d.scale * user_scale))
    for module_path, deltas in per_layer.items():
        layer = LoRALinear.from_adapters(get_module(model, module_path), deltas)
        layer.freeze(keys=["lora_A", "lora_B"], recurse=False)
        set_module(model, module_path, layer)
    logger.info("attached %d LoRA file(s) to %d layers", len(loaded), len(per_layer))
    return AttachReport([f for f, _ in loaded], sorted(per_layer))


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if not os.path.isfile(path):
        raise LoraFormatError(f"LoRA file not found: {path}")
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as error:  # mlx raises plain ValueError/RuntimeError on bad files
        raise LoraFormatError(f"{path} is not a readable .safetensors file ({error}).",
                              hint="LoRA files must be .safetensors.") from error
    return {k: np.array(v.astype(mx.float32)) for k, v in arrays.items()}, dict(metadata or {})


def _split_key(key: str):
    for suffix, file_format, what in SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], file_format, what
    return None


def _name_of(stem: str):
    """(naming kind, name) for a key stem, or None for layers we do not have."""
    if stem.startswith(TEXT_ENCODER_PREFIXES):
        return None
    if stem.startswith("lora_unet_"):
        return "bfl", stem[len("lora_unet_"):]
    if stem.startswith("lora_transformer_"):
        path = _UNDERSCORED_PATHS.get(stem[len("lora_transformer_"):]) or _underscored_block_path(stem)
        return ("path", path) if path else None
    changed = True
    while changed:
        changed = False
        for prefix in DOTTED_PREFIXES:
            if stem.startswith(prefix):
                stem, changed = stem[len(prefix):], True
    if stem.split(".")[0] in BFL_ROOTS:
        return "bfl", stem.replace(".", "_")
    for ours, theirs in MFLUX_NAMES.items():
        if stem.endswith("." + theirs):
            stem = stem[: -len(theirs)] + ours
    if re.fullmatch(r"transformer_blocks\.\d+\.attn\.to_out", stem):
        stem += ".0"
    return "path", stem


_UNDERSCORED_PATHS = {p.replace(".", "_"): p for p in GLOBAL_LAYERS}


def _underscored_block_path(stem: str):
    match = re.fullmatch(r"lora_transformer_(single_transformer_blocks|transformer_blocks)_(\d+)_(\w+)", stem)
    if not match:
        return None
    blocks, index, rest = match.groups()
    layers = SINGLE_BLOCK_LAYERS if blocks.startswith("single") else JOINT_BLOCK_LAYERS
    for layer in layers:
        if layer.replace(".", "_") == rest:
            return f"{blocks}.{index}.{layer}"
    return None


def _group_keys(tensors: dict[str, np.ndarray]):
    groups, unmatched, formats = {}, [], set()
    for key, value in tensors.items():
        split = _split_key(key)
        named = _name_of(split[0]) if split else None
        if named is None:
            unmatched.append(key)
            continue
        _, file_format, what = split
        group = groups.setdefault(named, {"keys": []})
        group[what] = value
        group["keys"].append(key)
        if file_format:
            formats.add(file_format)
    return groups, unmatched, formats


def _resolve(kind: str, name: str, parts: dict, peft_config: dict | None, model):
    """[(module path, LoraDelta)] for one file layer, or None if we have no such layer."""
    down, up = parts["A"], parts["B"]
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise LoraFormatError(f"LoRA layer '{name}' has shapes down {down.shape}, up {up.shape}: not a LoRA pair.")
    rank = down.shape[0]
    if "alpha" in parts:
        scale = float(parts["alpha"].reshape(-1)[0]) / rank
    else:
        scale = _peft_scale(name, rank, peft_config) if kind == "path" else 1.0
    if kind == "path":
        return [(name, _delta(down, up, scale))]
    targets = _bfl_targets(name)
    if targets is None:
        return None
    if len(targets) == 1:
        if targets[0] == SWAPPED_HALVES:
            up = np.concatenate(np.split(up, 2, axis=0)[::-1], axis=0)
        return [(targets[0], _delta(down, up, scale))]
    dims = _fused_dims(targets, down, up, model)
    resolved, start = [], 0
    for target, rows in zip(targets, dims):
        part_up = up[start:start + rows]
        start += rows
        # columns of up that are zero for this part contribute nothing: drop them (exact)
        used = np.flatnonzero(np.any(part_up != 0, axis=0))
        if used.size:
            resolved.append((target, _delta(down[used], part_up[:, used], scale)))
    return resolved


def _bfl_targets(name: str):
    match = re.fullmatch(r"(double|single)_blocks_(\d+)_(\w+)", name)
    if match:
        blocks, index, layer = match.groups()
        table, ours = (BFL_JOINT, "transformer_blocks") if blocks == "double" else (BFL_SINGLE, "single_transformer_blocks")
        return [f"{ours}.{index}.{part}" for part in table[layer]] if layer in table else None
    return [BFL_GLOBAL[name]] if name in BFL_GLOBAL else None


def _fused_dims(targets: list[str], down: np.ndarray, up: np.ndarray, model) -> list[int]:
    layers = [get_module(model, t) for t in targets] if model is not None else []
    if layers and all(isinstance(layer, (*LINEAR_TYPES, LoRALinear)) for layer in layers):
        dims = [linear_dims(layer)[1] for layer in layers]
    elif len(targets) == 3:  # q, k, v of equal width
        dims = [up.shape[0] // 3] * 3
    else:  # linear1: q, k, v as wide as the input, the MLP gets the rest
        hidden = down.shape[1]
        dims = [hidden] * 3 + [up.shape[0] - 3 * hidden]
    if sum(dims) != up.shape[0] or min(dims) <= 0:
        raise LoraFormatError(f"Fused LoRA layer for {targets[0]}... has {up.shape[0]} outputs; "
                              f"this model's parts have {dims}.",
                              hint="The LoRA was made for another model.")
    return dims


def _delta(down: np.ndarray, up: np.ndarray, scale: float) -> LoraDelta:
    return LoraDelta(mx.array(np.ascontiguousarray(down)), mx.array(np.ascontiguousarray(up)), scale)


def _peft_config(metadata: dict[str, str]) -> dict | None:
    # diffusers' save_lora_weights may store the PEFT LoraConfig (alpha, patterns) here
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        return None
    config = {k[len("transformer."):]: v for k, v in packed.items() if k.startswith("transformer.")}
    return config or None


def _peft_scale(module_path: str, rank: int, config: dict | None) -> float:
    if not config or "lora_alpha" not in config:
        return 1.0
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern.lstrip('^')})", module_path):
            alpha = value
            break
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


def _check_fits(path: str, adapters: dict, sources: dict, unmatched: list, model: nn.Module) -> None:
    misfits = []
    for module_path in list(adapters):
        layer = get_module(model, module_path)
        if not isinstance(layer, (*LINEAR_TYPES, LoRALinear)):
            unmatched.extend(sources[module_path])
            del adapters[module_path]
            continue
        input_dims, output_dims = linear_dims(layer)
        for delta in adapters[module_path]:
            if delta.lora_A.shape[1] != input_dims or delta.lora_B.shape[0] != output_dims:
                misfits.append(f"{module_path}: LoRA (in {delta.lora_A.shape[1]}, out {delta.lora_B.shape[0]}), "
                               f"layer (in {input_dims}, out {output_dims})")
    if misfits:
        raise LoraFormatError(f"{path} does not fit this model: " + "; ".join(misfits[:3]),
                              hint="The LoRA was made for another model (FLUX.1 dev/schnell LoRAs only).")


def _not_flux_message(path: str, keys: list[str]) -> str:
    if any(key.startswith("lora_unet_") and any(m in key for m in SD_MARKERS) for key in keys):
        return f"{path} is a Stable Diffusion (SD 1.5 / SDXL) LoRA, not a FLUX.1 LoRA."
    if keys and all(key.startswith(TEXT_ENCODER_PREFIXES) for key in keys):
        return f"{path} only changes a text encoder; this program applies LoRAs to the FLUX transformer."
    sample = ", ".join(sorted(keys)[:3]) or "none"
    return f"{path} is not a LoRA file this program knows (keys: {sample})."
