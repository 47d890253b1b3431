"""An engine error in a modal: what happened, what to do, where the log is. Enter or Esc closes."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static


class ErrorDialog(ModalScreen[None]):
    CSS_PATH = "error_dialog.tcss"
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("enter", "close", "Close", show=False),
    ]

    def __init__(self, title: str, message: str, hint: str | None = None, log_path: str | None = None):
        super().__init__()
        self.error_title = title
        self.message = message
        self.hint = hint
        self.log_path = log_path

    def compose(self) -> ComposeResult:
        with Vertical(id="error-box"):
            yield Label(self.error_title, id="error-title")
            yield Static(self.message, id="error-message", markup=False)
            if self.hint:
                yield Static(f"What to do: {self.hint}", id="error-hint", markup=False)
            if self.log_path:
                yield Static(f"Details in the log: {self.log_path}", id="error-log", markup=False)
            yield Button("OK (Enter)", id="error-ok", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#error-ok", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss()

    def action_close(self) -> None:
        self.dismiss()
