"""A picture drawn in the terminal: Kitty or Sixel graphics where the terminal has them, half-blocks otherwise.

textual-image asks the terminal what it supports when this module is first
imported, which only works before Textual takes over stdin: the wizard imports
this module before the app starts (tui/commands/wizard.py).
"""
from __future__ import annotations

from PIL import Image as PILImage
from textual.app import ComposeResult
from textual.containers import Container
from textual.widgets import Static
from textual_image.widget import HalfcellImage
from textual_image.widget import Image as TerminalImage


class Thumbnail(Container):
    """Shows a PIL image (or a placeholder text) scaled to the widget's width."""

    def __init__(self, placeholder: str = "no image", **kwargs):
        super().__init__(**kwargs)
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        # headless runs (tests, snapshots) draw half-blocks, the same on every machine
        image_class = HalfcellImage if self.app.is_headless else TerminalImage
        image = image_class(None, classes="thumbnail-image")
        image.display = False
        yield image
        yield Static(self.placeholder, classes="thumbnail-placeholder")

    def show(self, picture: PILImage.Image | None, placeholder: str | None = None) -> None:
        image = self.query_one(".thumbnail-image")
        label = self.query_one(".thumbnail-placeholder", Static)
        image.image = picture
        image.display = picture is not None
        label.display = picture is None
        if placeholder is not None:
            label.update(placeholder)
