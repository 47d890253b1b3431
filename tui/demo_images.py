"""Sample photos for the demo, drawn here so no third-party picture ships with us.

The subject is one toy robot (same colours, same shape) placed, scaled and
tilted differently on varied backgrounds: what DreamBooth needs to learn a
subject rather than a scene. Everything comes from one seeded generator, so
the demo images are byte-identical on every machine.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

DEMO_TRIGGER = "sks"
DEMO_CLASS_NOUN = "toy"
DEMO_SEED = 1127

# (width, height): squares and mild portrait/landscape, all between 256 and 512 px
SIZES = [(512, 512), (384, 512), (512, 384), (448, 448), (320, 400), (400, 320), (512, 448), (384, 384)]
BACKGROUNDS = ["gradient", "stripes", "checker", "dots", "gradient", "stripes", "dots", "checker"]
TOY_BODY = (214, 64, 52)
TOY_TRIM = (245, 196, 48)
TOY_EYES = (30, 30, 40)


def draw_demo_images(folder: Path, count: int = 8, seed: int = DEMO_SEED) -> list[Path]:
    """Write `count` demo photos of the toy into `folder`; returns their paths in order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        image = _background(BACKGROUNDS[index % len(BACKGROUNDS)], width, height, rng)
        toy = _toy(size=int(min(width, height) * rng.uniform(0.45, 0.7)))
        toy = toy.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC, expand=True)
        left = rng.randint(0, width - toy.width) if toy.width < width else 0
        top = rng.randint(0, height - toy.height) if toy.height < height else 0
        shadow = Image.new("RGBA", toy.size, (0, 0, 0, 0))
        shadow.putalpha(toy.getchannel("A").point(lambda a: a // 3))
        image.paste(shadow.filter(ImageFilter.GaussianBlur(6)), (left + 6, top + 8), shadow)
        image.paste(toy, (left, top), toy)
        path = folder / f"toy_{index + 1:02d}.png"
        image.convert("RGB").save(path, format="PNG")
        paths.append(path)
    return paths


def _toy(size: int) -> Image.Image:
    """The subject: a boxy robot with a yellow antenna, drawn on a transparent square."""
    toy = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(toy)
    unit = size / 10
    draw.rounded_rectangle([2 * unit, 4 * unit, 8 * unit, 9 * unit], radius=unit, fill=TOY_BODY)
    draw.rounded_rectangle([3 * unit, 1.5 * unit, 7 * unit, 4.2 * unit], radius=0.8 * unit, fill=TOY_BODY)
    draw.line([5 * unit, 1.5 * unit, 5 * unit, 0.5 * unit], fill=TOY_TRIM, width=max(2, int(unit / 3)))
    draw.ellipse([4.6 * unit, 0.1 * unit, 5.4 * unit, 0.9 * unit], fill=TOY_TRIM)
    for eye_x in (4 * unit, 6 * unit):
        draw.ellipse([eye_x - 0.45 * unit, 2.4 * unit, eye_x + 0.45 * unit, 3.3 * unit], fill=TOY_EYES)
    draw.rectangle([3.5 * unit, 5.5 * unit, 6.5 * unit, 6.2 * unit], fill=TOY_TRIM)
    for wheel_x in (3 * unit, 7 * unit):
        draw.ellipse([wheel_x - unit, 8.2 * unit, wheel_x + unit, 9.9 * unit], fill=TOY_EYES)
    return toy


def _background(kind: str, width: int, height: int, rng: random.Random) -> Image.Image:
    first = tuple(rng.randint(40, 230) for _ in range(3))
    second = tuple(rng.randint(40, 230) for _ in range(3))
    image = Image.new("RGBA", (width, height), first + (255,))
    draw = ImageDraw.Draw(image)
    if kind == "gradient":
        for y in range(height):
            t = y / max(1, height - 1)
            draw.line([0, y, width, y], fill=tuple(round(a + (b - a) * t) for a, b in zip(first, second)))
    elif kind == "stripes":
        band = rng.randint(18, 40)
        for x in range(-height, width, band * 2):
            draw.polygon([(x, 0), (x + band, 0), (x + band + height, height), (x + height, height)], fill=second)
    elif kind == "checker":
        cell = rng.randint(32, 64)
        for y in range(0, height, cell):
            for x in range(0, width, cell):
                if (x // cell + y // cell) % 2:
                    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=second)
    else:  # dots
        for _ in range(rng.randint(30, 60)):
            x, y, radius = rng.randint(0, width), rng.randint(0, height), rng.randint(4, 18)
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=second)
    return image
