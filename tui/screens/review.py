"""Review: the training config saved next to the photos, and the same run as one headless command."""
from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

from rich.syntax import Syntax
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Input, Label, Static

from engine.errors import ConfigError
from tui.screens.config_builder import (CONFIG_FILE_NAME, build_config, config_for_file, default_output_dir,
                                        images_folder)
from engine.paths import atomic_write, unwritable_reason
from tui.screens.step import StepScreen, display_path

log = logging.getLogger(__name__)


def folder_problem(folder: Path, what: str) -> str | None:
    """Why `folder` cannot be written (created if missing, then a probe file), or None."""
    reason = unwritable_reason(folder)
    if reason:
        return f"The {what} {display_path(folder)} cannot be written ({reason}): choose another folder."
    return None


def headless_command(config_path: Path) -> str:
    shown = display_path(config_path)
    quoted = shown if shown.startswith("~/") and shlex.quote(shown[2:]) == shown[2:] else shlex.quote(str(config_path))
    return f"dreambooth-wizard train --train-config {quoted}"


class ReviewScreen(StepScreen):
    STEP = "review"
    BACK = "memory"
    NEXT = "access"
    TITLE = "Review"
    CSS_PATH = "review.tcss"
    HELP = """\
This is the whole run as a training config in **mflux's format**: you can keep it, edit it, train
from it without the wizard, or share it. It is saved next to your photos.

- **Config file**: where the config is saved (photos are listed relative to it).
- **Output folder**: where checkpoints, previews and the final LoRA go. If it already holds a
  run, a new folder with the date is made beside it, nothing is overwritten.
- The **command** below trains the same run without the wizard (on a server, over ssh).

**Enter** (or **Ctrl+N**) saves the config and goes on to the model download and training.
**Esc** goes back.
"""
    BINDINGS = [Binding("enter", "next", "Save and train")]

    def compose_body(self) -> ComposeResult:
        state = self.app.state
        folder = images_folder(state) or Path.cwd()
        config_path = state.config_path or folder / CONFIG_FILE_NAME
        output_dir = state.output_dir or default_output_dir(state)
        with Vertical(id="review-main"):
            with Horizontal(classes="review-line"):
                yield Label("Config file", classes="review-label")
                yield Input(display_path(config_path), id="config-path", compact=True)
            yield Static("", id="config-path-error", classes="inline-error")
            with Horizontal(classes="review-line"):
                yield Label("Output folder", classes="review-label")
                yield Input(display_path(output_dir), id="output-dir", compact=True)
            yield Static("", id="output-dir-error", classes="inline-error")
            yield Static("", id="review-command")
            with VerticalScroll(id="config-view"):
                yield Static("", id="config-json")

    def on_mount(self) -> None:
        self.redraw()

    def paths(self) -> tuple[Path, Path]:
        config_path = Path(self.query_one("#config-path", Input).value.strip() or CONFIG_FILE_NAME).expanduser()
        output_dir = Path(self.query_one("#output-dir", Input).value.strip() or ".").expanduser()
        return config_path.absolute(), output_dir.absolute()

    @on(Input.Changed)
    def _path_changed(self) -> None:
        self.redraw()

    @on(Input.Submitted)
    def _path_submitted(self) -> None:
        self.action_next()

    def config_data(self) -> tuple[dict | None, str]:
        config_path, output_dir = self.paths()
        state = self.app.state
        saved_output, state.output_dir = state.output_dir, output_dir
        try:
            return config_for_file(build_config(state), state, config_path), ""
        except ConfigError as error:
            return None, str(error)
        finally:
            state.output_dir = saved_output

    def redraw(self) -> None:
        config_path, output_dir = self.paths()
        data, problem = self.config_data()
        command = self.query_one("#review-command", Static)
        command.update(f"[b]Enter[/b] saves the config and goes on to training. The same run headless:\n"
                       f"  [b]{headless_command(config_path)}[/b]")
        view = self.query_one("#config-json", Static)
        if data is None:
            view.update(f"✗ {problem}")
            return
        view.update(Syntax(json.dumps(data, indent=2), "json", theme="ansi_dark", background_color="default"))
        hint = self.query_one("#output-dir-error", Static)
        hint.update("")
        if (output_dir / "_checkpoints").is_dir():
            hint.update("⚠ This folder holds an earlier run: the new one goes to a dated folder beside it. "
                        "To continue the earlier run, use Resume on the welcome screen.")

    def problems(self) -> list[str]:
        config_path, output_dir = self.paths()
        errors = {"#config-path-error": None, "#output-dir-error": None}
        if config_path.is_dir():
            errors["#config-path-error"] = f"{config_path} is a folder: give a file name such as {CONFIG_FILE_NAME}."
        else:
            errors["#config-path-error"] = folder_problem(config_path.parent, "config file's folder")
        errors["#output-dir-error"] = folder_problem(output_dir, "output folder")
        for widget_id, problem in errors.items():
            self.query_one(widget_id, Static).update(f"✗ {problem}" if problem else "")
        problems = [problem for problem in errors.values() if problem]
        if not problems:
            data, problem = self.config_data()
            if data is None:
                problems.append(problem)
        return problems

    def commit(self) -> None:
        config_path, output_dir = self.paths()
        data, problem = self.config_data()
        if data is None:
            return
        try:
            with atomic_write(config_path) as temporary:
                temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        except OSError as error:
            # only a back step reaches here unchecked: the config is simply not saved
            log.warning("config not saved to %s: %s", config_path, error)
            return
        state = self.app.state
        state.config_path, state.output_dir = config_path, output_dir
        log.info("config saved to %s; output %s", config_path, output_dir)

    def action_back(self) -> None:
        self.app.goto(self.BACK)  # nothing is saved on the way back

    def next_screen(self) -> str | None:
        from tui.app import screen_exists

        # the access screen decides itself whether a download is needed (tiny and cached models skip it)
        return "access" if screen_exists("access") else "train"
