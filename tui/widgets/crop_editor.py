"""Choose the part of a photo that is trained: arrows move the box, +/- resize it, aspect kept.

The whole photo is drawn with everything outside the box darkened, next to the
box's own pixels as training will see them. Both come from a small copy of the
photo, so each key press redraws at once.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Label, Static

from engine.crops import CropBox, default_crop, move_crop, scale_crop
from tui.widgets.thumbnail import Thumbnail

MOVE_FRACTION = 0.05  # of the photo's longer side per arrow press
FINE_MOVE_FRACTION = 0.01  # with shift
SCALE_STEP = 1.1


def outline_crop(picture: Image.Image, box: CropBox, scale: float) -> Image.Image:
    """The picture with everything outside `box` darkened and the box outlined (box in full-size pixels)."""
    left, top = round(box.left * scale), round(box.top * scale)
    right, bottom = round(box.right * scale) - 1, round(box.bottom * scale) - 1
    shown = ImageEnhance.Brightness(picture).enhance(0.35)
    shown.paste(picture.crop((left, top, right + 1, bottom + 1)), (left, top))
    ImageDraw.Draw(shown).rectangle((left, top, right, bottom), outline=(255, 220, 0), width=max(1, picture.width // 80))
    return shown


def cropped(picture: Image.Image, box: CropBox, scale: float) -> Image.Image:
    return picture.crop((round(box.left * scale), round(box.top * scale),
                         max(round(box.right * scale), round(box.left * scale) + 1),
                         max(round(box.bottom * scale), round(box.top * scale) + 1)))


class CropEditor(ModalScreen[tuple[int, int, int, int] | None]):
    """Answers the new box as (left, top, width, height) in the photo's pixels, or None when cancelled."""

    BINDINGS = [
        Binding("up", "move(0, -1)", "Move", key_display="↑↓←→"),
        Binding("down", "move(0, 1)", "Move", show=False),
        Binding("left", "move(-1, 0)", "Move", show=False),
        Binding("right", "move(1, 0)", "Move", show=False),
        Binding("shift+up", "move(0, -1, True)", "Fine", show=False),
        Binding("shift+down", "move(0, 1, True)", "Fine", show=False),
        Binding("shift+left", "move(-1, 0, True)", "Fine", show=False),
        Binding("shift+right", "move(1, 0, True)", "Fine", show=False),
        Binding("plus,equals_sign", "scale(True)", "Larger", key_display="+"),
        Binding("minus,underscore", "scale(False)", "Smaller", key_display="-"),
        Binding("r", "reset", "Centre"),
        Binding("enter", "keep", "Keep"),
        Binding("escape", "cancel", "Cancel"),
    ]
    HELP = """\
The box is the part of the photo that is trained, at the training size.
Keep the subject inside it, with a little room around.

- **Arrow keys** move the box (**Shift+arrows** in small steps).
- **+** and **-** make it larger or smaller; its shape always matches the training size.
- **r** puts it back in the centre at the largest size.
- **Enter** keeps this box, **Esc** leaves the old one.
"""

    def __init__(self, path: Path, picture: Image.Image, full_size: tuple[int, int],
                 box: tuple[int, int, int, int] | None, target: tuple[int, int]):
        super().__init__()
        self.path = path
        self.picture = picture  # a small copy of the photo
        self.full_size = full_size
        self.target = target
        self.scale = picture.width / full_size[0]
        self.box = CropBox(*box) if box else default_crop(full_size, *target)

    def compose(self) -> ComposeResult:
        with Vertical(id="crop-box"):
            yield Label(f"Crop {self.path.name} ({self.full_size[0]}x{self.full_size[1]})", id="crop-title")
            with Horizontal(id="crop-views"):
                yield Thumbnail("loading…", id="crop-whole")
                yield Thumbnail("loading…", id="crop-result")
            yield Static("", id="crop-info")
        yield Footer()

    def on_mount(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        self.query_one("#crop-whole", Thumbnail).show(outline_crop(self.picture, self.box, self.scale))
        self.query_one("#crop-result", Thumbnail).show(cropped(self.picture, self.box, self.scale))
        share = self.box.width * self.box.height / (self.full_size[0] * self.full_size[1])
        self.query_one("#crop-info", Static).update(
            f"Box at {self.box.left},{self.box.top}, {self.box.width}x{self.box.height} pixels "
            f"({share:.0%} of the photo), trained at {self.target[0]}x{self.target[1]}")

    def action_move(self, dx: int, dy: int, fine: bool = False) -> None:
        step = max(1, round(max(self.full_size) * (FINE_MOVE_FRACTION if fine else MOVE_FRACTION)))
        self.box = move_crop(self.box, dx * step, dy * step, self.full_size)
        self.redraw()

    def action_scale(self, larger: bool) -> None:
        factor = SCALE_STEP if larger else 1 / SCALE_STEP
        self.box = scale_crop(self.box, factor, self.full_size, *self.target)
        self.redraw()

    def action_reset(self) -> None:
        self.box = default_crop(self.full_size, *self.target)
        self.redraw()

    def action_keep(self) -> None:
        self.dismiss(self.box.as_tuple())

    def action_cancel(self) -> None:
        self.dismiss(None)
