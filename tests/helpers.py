"""Small training sets and configs for tests: images drawn here, the tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def draw_subject(seed: int, size: int = 96) -> Image.Image:
    """A red disc on a varied background: the 'subject' a LoRA should learn."""
    rng = np.random.default_rng(seed)
    background = tuple(int(c) for c in rng.integers(40, 215, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    margin = size // 4 + int(rng.integers(-4, 5))
    draw.ellipse([margin, margin, size - margin, size - margin], fill=(220, 30, 30))
    return image


def make_training_folder(folder: Path, count: int = 3, size: int = 96, seed: int = 0,
                         prompt: str = "photo of sks toy", **overrides) -> Path:
    """Images plus an mflux config for the tiny model; returns the config's path."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(count):
        name = f"{index:02d}.png"
        draw_subject(seed + index, size).save(images / name)
        entries.append({"image": name, "prompt": prompt})
    config = {
        "model": "tiny", "seed": 42, "steps": 4, "guidance": 3.0, "quantize": None,
        "width": 64, "height": 64,
        "training_loop": {"num_epochs": 2, "batch_size": 1},
        "optimizer": {"name": "AdamW", "learning_rate": 1e-3},
        "save": {"output_path": str(folder / "out"), "checkpoint_frequency": 100},
        "instrumentation": {"plot_frequency": 100, "generate_image_frequency": 100, "validation_prompt": prompt},
        "lora_layers": {"single_transformer_blocks": {"block_range": {"start": 0, "end": 38},
                                                      "layer_types": ["proj_out", "proj_mlp", "attn.to_q",
                                                                      "attn.to_k", "attn.to_v"],
                                                      "lora_rank": 4}},
        "examples": {"path": "images/", "images": entries},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = folder / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def launches(outputs) -> list[str]:
    """The primitives that launch work in the graph MLX would run for `outputs`, sorted (views and
    wrappers launch none; inside a compiled function MLX wraps a lone op as Compiled<op>)."""
    import io
    import re

    import mlx.core as mx

    views = {"Broadcast", "Reshape", "Slice", "Transpose", "ExpandDims", "Squeeze", "AsStrided", "Flatten",
             "Unflatten", "CustomTransforms", "Depends", "StopGradient"}
    buffer = io.StringIO()
    mx.export_to_dot(buffer, *outputs)
    return sorted(name for name in re.findall(r'label ="([^"]+)", shape=rectangle', buffer.getvalue())
                  if name not in views)
