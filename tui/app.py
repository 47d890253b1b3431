"""The wizard's Textual app: a registry of screens by name and the app-wide keys.

Screens never import each other: they call `app.goto("label")` and read and
write `app.state`. Screen modules are imported only when first shown, so a
screen that another helper has not written yet breaks nothing until reached.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from textual.app import App
from textual.binding import Binding
from textual.screen import Screen

from tui.state import WizardState

log = logging.getLogger(__name__)

# name -> (module, class); each class takes no required arguments and reads `app.state`
SCREENS_BY_NAME = {
    "welcome": ("tui.screens.welcome", "WelcomeScreen"),
    "images": ("tui.screens.images", "ImagesScreen"),
    "label": ("tui.screens.label", "LabelScreen"),
    "template": ("tui.screens.template", "TemplateScreen"),
    "memory": ("tui.screens.memory", "MemoryScreen"),
    "review": ("tui.screens.review", "ReviewScreen"),
    "access": ("tui.screens.access", "AccessScreen"),
    "train": ("tui.screens.train", "TrainScreen"),
    "done": ("tui.screens.done", "DoneScreen"),
    "resume": ("tui.screens.resume", "ResumeScreen"),
}


def screen_class(name: str) -> type[Screen]:
    module_name, class_name = SCREENS_BY_NAME[name]
    return getattr(importlib.import_module(module_name), class_name)


def screen_exists(name: str) -> bool:
    """Whether the screen's module can be imported (lets a step skip one not written yet)."""
    try:
        screen_class(name)
    except (ImportError, AttributeError):
        return False
    return True


class WizardApp(App[int]):
    """From photos to a trained LoRA: welcome, images, label, template, memory, review, train."""

    CSS_PATH = "app.tcss"
    TITLE = "DreamBooth Wizard"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("f1", "help", "Help", show=False, priority=True),
        Binding("ctrl+c", "request_quit", "Quit", priority=True),
        Binding("ctrl+q", "request_quit", "Quit", show=False, priority=True),
    ]

    def __init__(self, state: WizardState | None = None, start: str = "welcome", machine: Any = None,
                 browse_root: Path | None = None, demo_folder: Path | None = None):
        super().__init__()
        self.state = state if state is not None else WizardState()
        self.start = start
        self._machine = machine
        # where the image browser opens; tests point it at a fixed folder
        self.browse_root = browse_root
        self.demo_folder = demo_folder  # where the demo draws its photos (default ./dreambooth-demo, as the command)

    @property
    def machine(self) -> Any:
        """This machine's chip or GPU and memory (engine.machine.MachineInfo), detected once.

        Injectable through the constructor so tests and snapshots show fixed values.
        """
        if self._machine is None:
            from engine.machine import detect_machine

            self._machine = detect_machine()
        return self._machine

    def on_mount(self) -> None:
        log.info("wizard starts at %s", self.start)
        self.goto(self.start)

    def goto(self, name: str) -> None:
        """Show the screen called `name` (a fresh one: screens keep nothing the state does not)."""
        log.info("screen %s", name)
        try:
            screen = screen_class(name)()
        except (ImportError, AttributeError) as error:  # a screen not written yet must not end the wizard
            log.exception("screen %s cannot be opened", name)
            self.notify(f"The {name} screen is not available: {error}", severity="error")
            return
        if len(self.screen_stack) <= 1:
            self.push_screen(screen)
        else:
            self.switch_screen(screen)

    def start_demo(self) -> None:
        """The demo: drawn sample photos and the tiny model, then the same steps as a real run."""
        from tui.commands.demo import DEFAULT_FOLDER, demo_state

        folder = (self.demo_folder or Path(DEFAULT_FOLDER)).resolve()
        self.state = demo_state(folder)
        log.info("demo in %s", folder)
        self.goto("images")

    def action_help(self) -> None:
        from tui.widgets.help_modal import HelpModal

        if isinstance(self.screen, HelpModal):
            self.screen.dismiss()
            return
        text = getattr(self.screen, "HELP", None) or "No help for this screen yet."
        title = getattr(self.screen, "TITLE", None) or self.title
        self.push_screen(HelpModal(title, text))

    def action_request_quit(self) -> None:
        from tui.widgets.confirm import ConfirmDialog

        if isinstance(self.screen, ConfirmDialog):
            return
        training = bool(getattr(self.screen, "training_running", False))
        if training:
            question = ("A training is running. Stop it and quit?\n"
                        "A checkpoint is saved first, so you can resume later.")
        else:
            question = "Quit the wizard?"
        self.push_screen(ConfirmDialog(question, yes="Quit", no="Stay"),
                         lambda confirmed: self._quit_confirmed(confirmed, training))

    def _quit_confirmed(self, confirmed: bool | None, training: bool) -> None:
        if not confirmed:
            return
        stop = getattr(self.screen, "stop_training", None)
        if training and callable(stop):
            # the training thread finishes its step and writes a checkpoint before the process ends
            stop()
        self.exit(0)
