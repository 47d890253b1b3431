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


async def wait_until(pilot, condition, timeout: float = 20.0, what: str = "condition") -> None:
    """Let workers and messages run until `condition()` holds (fails the test after `timeout` seconds)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)
    await pilot.pause()


async def wait_for_screen(pilot, name: str, timeout: float = 10.0) -> None:
    await wait_until(pilot, lambda: type(pilot.app.screen).__name__ == name, timeout, f"screen {name}")


async def type_into(pilot, selector: str, text: str, submit: bool = False) -> None:
    """Focus an Input, replace its text by typing, optionally press Enter."""
    from textual.widgets import Input

    widget = pilot.app.screen.query_one(selector)
    field = widget if isinstance(widget, Input) else widget.query_one(Input)
    field.focus()
    await pilot.pause()
    field.value = ""
    await pilot.press(*text)
    if submit:
        await pilot.press("enter")
    await pilot.pause()


def checked_state(folder: Path, model: str = "dev"):
    """A WizardState holding the good photos of `folder`, as the Images step leaves it."""
    from engine.crops import default_crop
    from engine.images import check_images
    from tui.state import ImageChoice, WizardState

    state = WizardState(model=model)
    for report in check_images(sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg"))):
        if report.status == "rejected":
            continue
        state.images.append(ImageChoice(report.path, prompt="photo of sks dog", status=report.status,
                                        reasons=list(report.reasons), size=report.size,
                                        crop=default_crop(report.size, 512, 512).as_tuple()))
    return state
