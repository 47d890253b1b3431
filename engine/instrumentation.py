"""What a run leaves for the user to judge it: loss history (JSON + PNG) and previews.

The guide's advice is to trust the pictures over the loss: previews use the
config's own steps, guidance and seed, so consecutive ones differ only by
what the LoRA learned.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.paths import atomic_write

PLOTS = Path("_validation") / "plots"
IMAGES = Path("_validation") / "images"


def preview_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / IMAGES / f"{step:07d}_validation_image.png"


def write_validation_image(output_dir: Path, step: int, model, validation, cfg) -> Path:
    """Sample the validation prompt at the training size with the current LoRA."""
    from engine.generate import decode_latents, denoise_latents, save_png

    hidden, pooled = validation.hidden[None], validation.pooled[None]
    latents = denoise_latents(model, hidden, pooled, cfg.width, cfg.height, cfg.steps, cfg.guidance, seed=cfg.seed)
    image = decode_latents(model, latents, cfg.width, cfg.height)[0]
    return save_png(image, preview_path(output_dir, step),
                    {"step": step, "prompt": cfg.instrumentation.validation_prompt, "seed": cfg.seed})


def write_loss_history(output_dir: Path, step: int, history: list[dict]) -> Path:
    """`NNNNNNN_loss.json` and a PNG plot of it; returns the PNG's path."""
    folder = Path(output_dir) / PLOTS
    with atomic_write(folder / f"{step:07d}_loss.json") as temporary:
        temporary.write_text(json.dumps(history, indent=1))
    png = folder / f"{step:07d}_loss.png"
    image = draw_loss_plot([entry["step"] for entry in history], [entry["loss"] for entry in history])
    with atomic_write(png) as temporary:
        image.save(temporary, format="PNG")
    return png


def draw_loss_plot(steps: list[int], losses: list[float], size: tuple[int, int] = (640, 360)):
    """A plain line plot of the loss and its moving average, drawn with Pillow."""
    from PIL import Image, ImageDraw

    width, height = size
    margin_left, margin_right, margin_top, margin_bottom = 60, 20, 20, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = margin_left, width - margin_right, margin_top, height - margin_bottom
    draw.rectangle([left, top, right, bottom], outline="black")
    if not losses:
        return image
    values = np.asarray(losses, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    high = high if high > low else low + 1e-6
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def point(step: float, loss: float) -> tuple[float, float]:
        x = left + (step - first) / (last - first) * (right - left)
        y = bottom - (loss - low) / (high - low) * (bottom - top)
        return x, y

    draw.line([point(s, v) for s, v in zip(steps, values)], fill=(150, 170, 220), width=1)
    window = max(1, min(20, len(values) // 4))
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    draw.line([point(s, v) for s, v in zip(steps[window - 1:], smooth)], fill=(20, 60, 160), width=2)
    for fraction in (0.0, 0.5, 1.0):
        loss = low + fraction * (high - low)
        _, y = point(first, loss)
        draw.text((4, y - 6), f"{loss:.4g}", fill="black")
    draw.text((left, bottom + 8), f"step {first}", fill="black")
    draw.text((right - 70, bottom + 8), f"step {steps[-1]}", fill="black")
    draw.text((left + 8, top + 4), "loss (thick: moving average)", fill="black")
    return image
