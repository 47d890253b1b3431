"""Validation previews: the latest one large (Train screen), all of them as a strip (Done screen).

Images are drawn by textual-image: Kitty or Sixel graphics where the terminal
has them, coloured half-blocks or characters otherwise.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.reactive import reactive
from textual.widgets import Label, Static
from textual_image.widget import Image

PREVIEW_NAME = re.compile(r"^(\d+)_validation_image\.png$")


@dataclass(frozen=True)
class Preview:
    step: int
    path: Path


def find_previews(output_dir: Path | None) -> list[Preview]:
    """The trainer's validation images in `<output>/_validation/images/`, by step."""
    if output_dir is None:
        return []
    folder = Path(output_dir) / "_validation" / "images"
    found = []
    for path in folder.glob("*_validation_image.png") if folder.is_dir() else []:
        match = PREVIEW_NAME.match(path.name)
        if match:
            found.append(Preview(int(match.group(1)), path))
    return sorted(found, key=lambda preview: preview.step)


class PreviewViewer(Vertical):
    """One preview at a time, the newest unless the user browses back with [ and ]."""

    index: reactive[int] = reactive(-1, init=False)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.previews: list[Preview] = []

    def compose(self) -> ComposeResult:
        yield Image(None, id="preview-image")
        yield Label("No preview yet (v draws one)", id="preview-caption")

    def add(self, preview: Preview) -> None:
        """Show a new preview; a user looking at an older one keeps looking at it."""
        following_latest = self.index == len(self.previews) - 1
        self.previews.append(preview)
        if following_latest:
            self.index = len(self.previews) - 1
        else:
            self._update_caption()

    def show_older(self) -> None:
        if self.index > 0:
            self.index -= 1

    def show_newer(self) -> None:
        if self.index < len(self.previews) - 1:
            self.index += 1

    @property
    def current(self) -> Preview | None:
        return self.previews[self.index] if 0 <= self.index < len(self.previews) else None

    def watch_index(self) -> None:
        preview = self.current
        if preview is not None:
            self.query_one("#preview-image", Image).image = preview.path
        self._update_caption()

    def _update_caption(self) -> None:
        preview = self.current
        if preview is None:
            return
        self.query_one("#preview-caption", Label).update(
            f"step {preview.step} · {self.index + 1} of {len(self.previews)} · [ ] browse")


class PreviewThumbnail(Vertical, can_focus=True):
    """One entry of the Done screen's strip: a picture (or a note) and its step."""

    def __init__(self, step: int, image_path: Path | None, note: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.step = step
        self.image_path = image_path
        self.note = note

    def compose(self) -> ComposeResult:
        if self.image_path is not None:
            yield Image(self.image_path, classes="thumbnail-image")
        else:
            yield Static("no preview", classes="thumbnail-missing")
        yield Label(f"step {self.step}{' ' + self.note if self.note else ''}", classes="thumbnail-caption")
