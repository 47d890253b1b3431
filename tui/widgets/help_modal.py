"""`?` on any screen: that screen's help text in a modal."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Markdown


class HelpModal(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("q", "close", "Close", show=False),
        Binding("question_mark", "close", "Close", show=False),
    ]

    def __init__(self, title: str, text: str):
        super().__init__()
        self.help_title = title
        self.help_text = text

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            yield Label(f"Help: {self.help_title}", id="help-title")
            with VerticalScroll(id="help-body"):
                yield Markdown(self.help_text)
            yield Label("Esc or ? closes this help", id="help-hint")

    def action_close(self) -> None:
        self.dismiss()
