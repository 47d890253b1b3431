"""What every setup step shares: the steps header, Esc for back, Ctrl+N for next.

A step checks its own input in `problems()` (shown inline, never raised) and
writes what it learned into `app.state` in `commit()` before the next screen.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static

from tui.widgets.step_header import StepHeader


class StepScreen(Screen):
    STEP: ClassVar[str] = ""
    BACK: ClassVar[str | None] = None
    NEXT: ClassVar[str | None] = None
    TITLE: ClassVar[str] = ""
    HELP: ClassVar[str] = ""
    BINDINGS = [
        Binding("ctrl+n", "next", "Next step", priority=True),
        Binding("escape", "back", "Back"),
    ]

    def compose(self) -> ComposeResult:
        yield StepHeader(self.STEP, id="step-header")
        yield from self.compose_body()
        yield Static("", id="step-problems", classes="problems")
        yield Footer()

    def compose_body(self) -> ComposeResult:
        yield from ()

    def problems(self) -> list[str]:
        """What stops the user from going on (shown under the step)."""
        return []

    def commit(self) -> None:
        """Write this step's choices into app.state."""

    def next_screen(self) -> str | None:
        return self.NEXT

    def show_problems(self, problems: list[str]) -> None:
        box = self.query_one("#step-problems", Static)
        box.update("\n".join(f"✗ {problem}" for problem in problems))
        box.set_class(bool(problems), "visible")

    def action_next(self) -> None:
        problems = self.problems()
        self.show_problems(problems)
        if problems:
            self.app.bell()
            return
        self.commit()
        target = self.next_screen()
        if target:
            self.app.goto(target)

    def action_back(self) -> None:
        if self.BACK:
            self.commit()
            self.app.goto(self.BACK)


def training_size(state) -> tuple[int, int]:
    """(width, height) the photos are trained at: the config's once a template is chosen, else 512x512."""
    config = state.config or {}
    return int(config.get("width") or 512), int(config.get("height") or 512)


def display_path(path: Path) -> str:
    """`~/photos/x.json` for paths under the home folder: shorter, and the same on every machine."""
    try:
        return "~/" + str(Path(path).relative_to(Path.home()))
    except ValueError:
        return str(path)
