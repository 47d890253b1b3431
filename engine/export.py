"""A checkpoint's LoRA as a file for mflux, diffusers or kohya/ComfyUI.

Checkpoints hold the adapter in mflux's format (FORMATS.md section 3); the
writers in engine/lora_formats.py produce the other formats from it exactly.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlx.core as mx

from engine.errors import UserError

FORMATS = ("mflux", "diffusers", "kohya")


def adapter_to_bytes(flat: dict[str, mx.array], metadata: dict[str, str]) -> bytes:
    """Our flat LoRA parameters as the bytes of an mflux-format safetensors file."""
    from engine.lora_formats import save_mflux

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "adapter.safetensors")
        save_mflux(path, flat, metadata)
        return Path(path).read_bytes()


def adapter_from_bytes(data: bytes) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Flat `<our module path>.lora_A/B` parameters and metadata from mflux-format bytes."""
    from engine.lora_formats import load_lora_file

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "adapter.safetensors")
        Path(path).write_bytes(data)
        lora = load_lora_file(path)
    flat = {}
    for module_path, deltas in lora.adapters.items():
        delta = deltas[0]
        flat[f"{module_path}.lora_A"] = delta.lora_A
        flat[f"{module_path}.lora_B"] = delta.lora_B * delta.scale if delta.scale != 1.0 else delta.lora_B
    return flat, dict(lora.metadata)


def adapter_metadata(config) -> dict[str, str]:
    """What a LoRA file should say about itself: base model, ranks, trigger word."""
    from engine.config import infer_trigger

    ranks = []
    for spec in (config.lora_layers.transformer_blocks, config.lora_layers.single_transformer_blocks):
        if spec is not None:
            ranks.append(str(spec.lora_rank))
    trigger = infer_trigger([image.prompt for image in config.examples.images])
    return {"base_model": str(config.model), "lora_rank": ",".join(ranks), "trigger_word": trigger or "",
            "software": "dreambooth-wizard"}


def export_checkpoint(checkpoint_path: str | Path, fmt: str, output_path: str | Path) -> Path:
    """Write the checkpoint's adapter as `fmt` to `output_path`; returns the path."""
    from engine.checkpoint import read_checkpoint
    from engine.lora_formats import save_diffusers, save_kohya, save_mflux

    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise UserError(f"unknown LoRA format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    contents = read_checkpoint(Path(checkpoint_path))
    flat, metadata = adapter_from_bytes(contents.adapter)
    output = Path(output_path).expanduser()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        from engine.errors import OutputError

        raise OutputError(f"cannot create {output.parent} ({error.strerror})", "choose a folder you can write to") from error
    metadata = {**metadata, "exported_from": Path(checkpoint_path).name, "step": str(contents.step)}
    writer = {"mflux": save_mflux, "diffusers": save_diffusers, "kohya": save_kohya}[fmt]
    writer(str(output), flat, metadata)
    return output
