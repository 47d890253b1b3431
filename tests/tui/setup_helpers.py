"""Fixtures for the setup-screen tests: photos drawn here, a fixed machine, key helpers."""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from engine.machine import MachineInfo

GIB = 2**30
FIXED_MACHINE = MachineInfo("apple", "Apple M2 Max", 64 * GIB, 48 * GIB)
SMALL_MACHINE = MachineInfo("cuda", "NVIDIA GeForce RTX 3060", 12 * GIB, int(11.4 * GIB))


def draw_photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A sharp, varied picture (shapes on a background): passes the blur check, no two alike."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        x1, y1 = x0 + rng.randrange(20, size[0] // 2), y0 + rng.randrange(20, size[1] // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def make_photo_folder(folder: Path) -> Path:
    """Good PNG and JPEG photos, one too small, one text file, one unreadable 'photo'."""
    for index in range(5):
        draw_photo(folder / f"dog{index + 1}.png", (640, 576), seed=index)
    draw_photo(folder / "dog6.jpg", (768, 512), seed=6)
    draw_photo(folder / "tiny.png", (120, 90), seed=7)
    (folder / "notes.txt").write_text("not a photo")
    broken = folder / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg at all")
    broken.chmod(0)
    return folder
