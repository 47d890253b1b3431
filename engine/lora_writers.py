"""Writing LoRA files: mflux, diffusers/PEFT and kohya (BFL names), each loading in its own
tools (FORMATS.md s.4). Every file bakes its scale into B and carries scale 1 (no alpha, or
alpha = rank for kohya); fused BFL layers are stacked back exactly (concatenated down,
block-diagonal up). Files are written atomically."""
from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
from mlx import nn

from engine.errors import LoraFormatError, OutputError
from engine.lora import LoraDelta, get_module, linear_dims, lora_deltas
from engine.lora_names import (
    BFL_GLOBAL,
    BFL_JOINT,
    BFL_SINGLE,
    MFLUX_NAMES,
    MFLUX_VERSION,
    SWAPPED_HALVES,
)
from engine.paths import atomic_write


def save_mflux(path: str, source, metadata: dict | None = None) -> None:
    """mflux layout: `transformer.<path>.lora_A` (rank, in), `.lora_B`, float32, scale 1."""
    merged = _merged_deltas(source)
    tensors = {}
    for module_path, (down, up) in merged.items():
        name = _mflux_path(module_path)
        tensors[f"transformer.{name}.lora_A"] = down
        tensors[f"transformer.{name}.lora_B"] = up
    header = {"mflux_version": MFLUX_VERSION, **_block_specs(merged)}
    _write(path, tensors, _metadata(header, metadata, merged, "mflux"))


def save_diffusers(path: str, source, metadata: dict | None = None) -> None:
    """diffusers/PEFT layout: `transformer.<path>.lora_A.weight`, no alpha.

    Without alpha keys or a PEFT config, diffusers takes alpha = rank for every
    layer (scale 1), which is exactly what the baked B needs.
    """
    merged = _merged_deltas(source)
    tensors = {}
    for module_path, (down, up) in merged.items():
        tensors[f"transformer.{module_path}.lora_A.weight"] = down
        tensors[f"transformer.{module_path}.lora_B.weight"] = up
    _write(path, tensors, _metadata({}, metadata, merged, "diffusers"))


def save_kohya(path: str, source, metadata: dict | None = None, model: nn.Module | None = None) -> None:
    """kohya layout with BFL names, fused layers stacked exactly; alpha = rank (scale 1).

    `model` gives the widths of fused parts that were not trained; without it
    FLUX's own ratios are assumed (q, k, v as wide as the input, MLP 4x).
    """
    merged = _merged_deltas(source)
    fused_groups: dict[str, dict[str, tuple]] = {}
    tensors = {}
    for module_path, (down, up) in merged.items():
        name, parts = _bfl_name(module_path)
        if name is None:
            raise LoraFormatError(f"Layer {module_path} has no kohya (BFL) name; save it as mflux or diffusers.")
        if len(parts) == 1:
            if module_path == SWAPPED_HALVES:
                up = np.concatenate(np.split(up, 2, axis=0)[::-1], axis=0)
            _put_kohya(tensors, name, down, up)
        else:
            fused_groups.setdefault(name, {"parts": parts})[module_path] = (down, up)
    for name, group in fused_groups.items():
        parts = group.pop("parts")
        down, up = _stack_fused(parts, group, model)
        _put_kohya(tensors, name, down, up)
    _write(path, tensors, _metadata({}, metadata, merged, "kohya"))


def _merged_deltas(source) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{path: (down, up)} as float32 numpy, each layer's adapters summed, scale baked into up."""
    from engine.lora_formats import (
        LoraFile,  # the reader's type; it imports this module
    )

    if isinstance(source, nn.Module):
        deltas = lora_deltas(source)
    elif isinstance(source, LoraFile):
        deltas = source.adapters
    elif all(isinstance(v, list) for v in source.values()):
        deltas = source
    else:  # flat {"<path>.lora_A": A, "<path>.lora_B": B} from lora_parameters
        paths = sorted({k.rpartition(".")[0] for k in source})
        deltas = {p: [LoraDelta(source[f"{p}.lora_A"], source[f"{p}.lora_B"], 1.0)] for p in paths}
    merged = {}
    for module_path, items in sorted(deltas.items()):
        downs = [np.array(d.lora_A.astype(mx.float32)) for d in items]
        ups = [np.array(d.lora_B.astype(mx.float32)) * np.float32(d.scale) if d.scale != 1.0
               else np.array(d.lora_B.astype(mx.float32)) for d in items]
        merged[module_path] = (np.concatenate(downs, axis=0), np.concatenate(ups, axis=1))
    if not merged:
        raise LoraFormatError("There is no LoRA adapter to save.")
    return merged


def _mflux_path(module_path: str) -> str:
    for ours, theirs in MFLUX_NAMES.items():
        if module_path.endswith("." + ours):
            return module_path[: -len(ours)] + theirs
    return module_path


def _bfl_name(module_path: str):
    """(kohya BFL name, the fused group's parts) for one of our layers."""
    match = re.fullmatch(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)", module_path)
    if match:
        blocks, index, layer = match.groups()
        table, theirs = (BFL_SINGLE, "single_blocks") if blocks.startswith("single") else (BFL_JOINT, "double_blocks")
        for name, parts in table.items():
            if layer in parts:
                return f"{theirs}_{index}_{name}", [f"{blocks}.{index}.{p}" for p in parts]
        return None, None
    for name, ours in BFL_GLOBAL.items():
        if ours == module_path:
            return name, [module_path]
    return None, None


def _stack_fused(parts: list[str], trained: dict, model) -> tuple[np.ndarray, np.ndarray]:
    """One (down, up) whose product stacks each part's product; untrained parts get zero rows."""
    input_dims = next(iter(trained.values()))[0].shape[1]
    widths = []
    for index, part in enumerate(parts):
        layer = get_module(model, part) if model is not None else None
        if layer is not None:
            widths.append(linear_dims(layer)[1])
        elif part in trained:
            widths.append(trained[part][1].shape[0])
        else:
            widths.append(input_dims * (4 if index == 3 else 1))  # FLUX: MLP 4x wider
    downs = [trained[p][0] for p in parts if p in trained]
    up = np.zeros((sum(widths), sum(d.shape[0] for d in downs)), dtype=np.float32)
    row = col = 0
    for part, width in zip(parts, widths):
        if part in trained:
            part_up = trained[part][1]
            up[row:row + width, col:col + part_up.shape[1]] = part_up
            col += part_up.shape[1]
        row += width
    return np.concatenate(downs, axis=0), up


def _put_kohya(tensors: dict, name: str, down: np.ndarray, up: np.ndarray) -> None:
    tensors[f"lora_unet_{name}.lora_down.weight"] = down
    tensors[f"lora_unet_{name}.lora_up.weight"] = up
    tensors[f"lora_unet_{name}.alpha"] = np.array(down.shape[0], dtype=np.float32)


def _block_specs(merged: dict) -> dict[str, str]:
    # mflux stores its lora_layers blocks as strings; ours describe what the file holds
    specs = {}
    for blocks in ("transformer_blocks", "single_transformer_blocks"):
        found = [p.split(".", 2) for p in merged if p.startswith(blocks + ".")]
        if found:
            specs[blocks] = str({
                "block_indices": sorted({int(i) for _, i, _ in found}),
                "layer_types": sorted({_mflux_path(f"{blocks}.0.{layer}").split(".", 2)[2] for _, _, layer in found}),
                "lora_rank": sorted({merged[p][0].shape[0] for p in merged if p.startswith(blocks + ".")}),
            })
    return specs


def _metadata(header: dict, user: dict | None, merged: dict, lora_format: str) -> dict[str, str]:
    ranks = sorted({down.shape[0] for down, _ in merged.values()})
    # the caller's keys may come from another file (an export): the format is always this one
    combined = {**header, "lora_rank": ",".join(map(str, ranks)), **(user or {}), "lora_format": lora_format}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in combined.items() if v is not None}


def _write(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    from safetensors.numpy import save

    # bytes written by Python, so a full disk is an OSError that says so (safetensors' own writer hides it)
    data = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, metadata)
    try:
        with atomic_write(path, suffix=".safetensors") as temporary:
            temporary.write_bytes(data)
    except OSError as error:
        raise OutputError(f"cannot write the LoRA file {path} ({error.strerror})",
                          "choose a folder you can write to, or free disk space") from error
