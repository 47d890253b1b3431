"""Welcome: what this does, which machine it runs on, which model; then new, resume or demo."""
from __future__ import annotations

import logging
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, RadioButton, RadioSet, Static

from tui.widgets.choice_row import ChoiceRow

log = logging.getLogger(__name__)

GIB = 2**30

MODELS = (
    ("dev", "FLUX.1-dev: the best results; gated on Hugging Face (accept its license once), ~34 GB download."),
    ("schnell", "FLUX.1-schnell: open license, ~34 GB download; learns a subject less faithfully than dev."),
    ("tiny", "A tiny model made on this machine: tries the whole wizard in minutes, learns nothing useful."),
    ("other", "A Hugging Face repo id (owner/name) in the diffusers layout, or a folder with one."),
)


class MachineDetected(Message):
    def __init__(self, summary: str) -> None:
        self.summary = summary
        super().__init__()


def describe_machine(info) -> str:
    """'Apple M2 Max, 64.0 GiB unified memory (48.0 GiB usable for training)' from a MachineInfo."""
    memory_kind = {"apple": "unified memory", "cuda": "GPU memory", "cpu": "RAM"}.get(info.kind, "memory")
    text = f"{info.name}, {info.total_memory / GIB:.1f} GiB {memory_kind}"
    if info.available_for_training:
        text += f" ({info.available_for_training / GIB:.1f} GiB usable for training)"
    if info.kind == "cpu":
        text += "\nNo GPU: training runs on the CPU, fine for the tiny model, very slow for FLUX.1."
    for note in info.notes:
        text += f"\n{note}"
    return text


class WelcomeScreen(Screen):
    TITLE = "Welcome"
    CSS_PATH = "welcome.tcss"
    HELP = """\
**DreamBooth** teaches FLUX.1 one subject (your dog, your face, an art style) from 5-20 photos.
The result is a small *LoRA* file you load next to FLUX.1 and call with a made-up *trigger word*
such as `sks`: "photo of sks dog on the beach".

The wizard walks you through it: pick and check photos, label them, choose a template of settings,
check that it fits this machine's memory, then train and watch previews appear.

- **n** starts a new training with the chosen base model.
- **r** continues a training from one of its checkpoints.
- **d** runs the demo: drawn sample photos and the tiny model, the whole flow in a couple of minutes.
- Arrow keys pick the base model; *other* takes a Hugging Face repo id or a local folder.
- **Ctrl+C** asks before quitting. **?** or **F1** opens the help of any screen.
"""
    BINDINGS = [
        Binding("n", "new", "New training"),
        Binding("r", "resume", "Resume"),
        Binding("d", "demo", "Demo"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="welcome"):
            yield Static("DreamBooth Wizard", id="welcome-title")
            yield Static("Teach FLUX.1 your own subject from a handful of photos: the wizard prepares the "
                         "photos, labels them, picks settings that fit this machine, trains a LoRA and shows "
                         "previews as it learns.", id="welcome-intro")
            yield Static("This machine: detecting…", id="machine")
            yield Label("Base model", classes="section-title")
            with ChoiceRow(id="model-choice"):
                for name, _ in MODELS:
                    yield RadioButton(name, value=name == self._initial_choice(), name=name)
            yield Input(placeholder="owner/name or a folder", id="model-other")
            yield Static("", id="model-hint", classes="hint")
            yield Static("", id="model-error", classes="inline-error")
            with Vertical(id="actions"):
                yield Static("[b]n[/b]  New training: photos → labels → settings → train")
                yield Static("[b]r[/b]  Resume a training from a checkpoint")
                yield Static("[b]d[/b]  Demo: sample photos and the tiny model, end to end")
        yield Footer()

    def _initial_choice(self) -> str:
        model = self.app.state.model
        return model if model in ("dev", "schnell", "tiny") else "other"

    def on_mount(self) -> None:
        other = self.query_one("#model-other", Input)
        if self._initial_choice() == "other":
            other.value = self.app.state.model
        self._show_model_hint(self._initial_choice())
        self.query_one("#model-choice", ChoiceRow).focus()
        self.detect_machine()

    @work(thread=True, exclusive=True, exit_on_error=False, group="machine")
    def detect_machine(self) -> None:
        try:
            summary = describe_machine(self.app.machine)
        except Exception as error:  # detection is advice only; never stop the wizard for it
            log.warning("machine detection failed: %s", error)
            summary = "could not be detected (memory advice will be rough)"
        self.post_message(MachineDetected(summary))

    def on_machine_detected(self, message: MachineDetected) -> None:
        self.query_one("#machine", Static).update(f"This machine: {message.summary}")

    @on(RadioSet.Changed, "#model-choice")
    def _model_changed(self, event: RadioSet.Changed) -> None:
        self._show_model_hint(event.pressed.name or "dev")

    def _show_model_hint(self, choice: str) -> None:
        self.query_one("#model-hint", Static).update(dict(MODELS)[choice])
        self.query_one("#model-other", Input).display = choice == "other"
        self.query_one("#model-error", Static).update("")

    def chosen_model(self) -> tuple[str | None, str]:
        """(model name, problem); the model is None when the choice cannot be used."""
        pressed = self.query_one("#model-choice", ChoiceRow).pressed_button
        choice = pressed.name if pressed is not None else "dev"
        if choice != "other":
            return choice, ""
        text = self.query_one("#model-other", Input).value.strip()
        if not text:
            return None, "Type a Hugging Face repo id (owner/name) or a model folder, or pick dev, schnell or tiny."
        from engine.config import model_source

        kind, _ = model_source(text, Path.cwd())
        if kind == "unknown":
            return None, f"{text!r} is neither a folder on this machine nor a repo id like owner/name."
        return text, ""

    def action_new(self) -> None:
        model, problem = self.chosen_model()
        self.query_one("#model-error", Static).update(problem)
        if model is None:
            self.app.bell()
            return
        state = self.app.state
        state.model = model
        state.demo = False
        log.info("new training with model %s", model)
        self.app.goto("images")

    def action_resume(self) -> None:
        self.app.goto("resume")

    def action_demo(self) -> None:
        self.app.start_demo()
