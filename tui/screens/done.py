"""Done: the previews across the steps, so the user picks the checkpoint that looks best.

The guide's advice: trust the pictures over the loss. The loss of a LoRA that
has started to copy its photos (overfitting) still falls; its previews stop
following the prompt. So every checkpoint is shown with the preview drawn at
its step, and any of them can be exported with one key.
"""
from __future__ import annotations

import logging
import shlex
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import HorizontalScroll, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Label, Static
from textual.worker import Worker, WorkerState

from tui.widgets.preview import PreviewThumbnail, find_previews
from tui.widgets.step_header import StepHeader

log = logging.getLogger(__name__)

EXPORT_KEYS = {"m": "mflux", "d": "diffusers", "k": "kohya"}


def export_path(output_dir: Path, step: int, fmt: str) -> Path:
    """Where the Done screen writes a checkpoint's LoRA in `fmt`."""
    return Path(output_dir) / "exports" / f"{step:07d}_{fmt}.safetensors"


def generate_command(model: str, prompt: str, adapter: Path | str) -> str:
    return (f"dreambooth-wizard generate --model {shlex.quote(str(model))} --prompt {shlex.quote(prompt)} "
            f"--lora-paths {shlex.quote(str(adapter))}")


class DoneScreen(Screen):
    TITLE = "Done"
    CSS_PATH = "done.tcss"
    HELP = """\
Each picture is the preview drawn at a checkpoint's step, oldest on the left.

**Pick by the pictures, not by the loss.** Early checkpoints may not know your subject yet;
late ones may have *overfitted*: they copy your photos (same pose, same background) and stop
following the prompt, while the loss still looks fine. Choose the first one that looks like
your subject and still follows the prompt.

- **←/→** choose a checkpoint.
- **m** exports its LoRA for mflux (also what `dreambooth-wizard generate` reads),
  **d** for diffusers, **k** for kohya / ComfyUI / Forge. Files go to `exports/` in the output folder.
- The command at the bottom generates with the chosen LoRA.
- **q** quits the wizard.
"""
    BINDINGS = [
        Binding("left", "select(-1)", "Earlier", key_display="←"),
        Binding("right", "select(1)", "Later", key_display="→"),
        Binding("m", "export('mflux')", "mflux"),
        Binding("d", "export('diffusers')", "diffusers"),
        Binding("k", "export('kohya')", "kohya"),
        Binding("q", "quit_wizard", "Quit"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.checkpoints: list = []
        self.has_previews = False
        self.selected = 0
        self.exported: dict[int, Path] = {}  # step -> the last file exported for it

    def compose(self) -> ComposeResult:
        yield StepHeader("train", id="step-header")
        with Vertical(id="done"):
            yield Label("", id="done-title")
            yield Static("Pick the checkpoint whose pictures look best: trust the previews over the loss. "
                         "Trained too long, a LoRA copies your photos (overfits) while its loss keeps falling.",
                         id="done-advice", classes="hint")
            yield HorizontalScroll(id="done-strip")
            yield Static("", id="done-selected")
            yield Static("", id="done-adapter")
            yield Static("", id="done-command")
            yield Static("", id="done-exports")
        yield Footer()

    def on_mount(self) -> None:
        self.load_checkpoints()

    # -- contents -------------------------------------------------------------------------------

    @property
    def output_dir(self) -> Path | None:
        return self.app.state.output_dir

    def load_checkpoints(self) -> None:
        from engine.checkpoint import list_checkpoints

        title = self.query_one("#done-title", Label)
        if self.output_dir is None or not Path(self.output_dir).is_dir():
            title.update("No training output folder is known: run a training or open `dreambooth-wizard resume`.")
            return
        self.checkpoints = list_checkpoints(self.output_dir)
        if not self.checkpoints:
            title.update(f"No checkpoints in {self.output_dir}.")
            return
        last = self.checkpoints[-1]
        title.update(f"Training output: {self.output_dir}  ·  {len(self.checkpoints)} checkpoints, "
                     f"last at step {last.step}")
        previews = {preview.step: preview.path for preview in find_previews(self.output_dir)}
        self.has_previews = bool(previews)
        strip = self.query_one("#done-strip", HorizontalScroll)
        strip.mount_all(
            PreviewThumbnail(info.step, previews.get(info.step),
                             note=f"loss {info.last_loss:.3f}" if info.last_loss is not None else "",
                             classes="thumbnail")
            for info in self.checkpoints)
        self.selected = len(self.checkpoints) - 1
        self.call_after_refresh(self.show_selection)

    def show_selection(self) -> None:
        if not self.checkpoints:
            return
        thumbnails = list(self.query(PreviewThumbnail))
        for index, thumbnail in enumerate(thumbnails):
            thumbnail.set_class(index == self.selected, "-selected")
        if 0 <= self.selected < len(thumbnails):
            self.query_one("#done-strip", HorizontalScroll).scroll_to_widget(thumbnails[self.selected], animate=False)
        info = self.checkpoints[self.selected]
        note = "" if self.has_previews else "  ·  no previews in this run (the config has no validation prompt)"
        self.query_one("#done-selected", Static).update(
            Text.assemble(("Chosen: ", "bold"), f"step {info.step}  ·  {Path(info.path).name}{note}"))
        adapter = self.adapter_for(info)
        prompt = self.prompt_for(info.config)
        if adapter is not None:
            where = str(adapter)
        else:
            where = "inside the checkpoint: press m (mflux), d (diffusers) or k (kohya) to export it"
            adapter = export_path(self.output_dir, info.step, "mflux")
        self.query_one("#done-adapter", Static).update(Text.assemble(("LoRA: ", "bold"), where))
        self.query_one("#done-command", Static).update(
            Text.assemble(("Use it: ", "bold"), generate_command(info.model, prompt, adapter)))

    def adapter_for(self, info) -> Path | None:
        """A LoRA file for this checkpoint: one exported here, or the run's final adapter at its step."""
        if info.step in self.exported:
            return self.exported[info.step]
        for fmt in EXPORT_KEYS.values():
            path = export_path(self.output_dir, info.step, fmt)
            if path.is_file():
                return path
        from engine.trainer import ADAPTER_NAME

        final = Path(self.output_dir) / ADAPTER_NAME
        if info is self.checkpoints[-1] and final.is_file():
            return final
        return None

    def prompt_for(self, config: dict) -> str:
        prompt = (config.get("instrumentation") or {}).get("validation_prompt")
        if prompt:
            return prompt
        state = self.app.state
        return f"photo of {state.trigger} {state.class_noun}"

    # -- keys -------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("select", "export"):
            return True if self.checkpoints else None
        return True

    def action_select(self, delta: int) -> None:
        if self.checkpoints:
            self.selected = max(0, min(len(self.checkpoints) - 1, self.selected + delta))
            self.show_selection()

    def action_export(self, fmt: str) -> None:
        if not self.checkpoints:
            return
        info = self.checkpoints[self.selected]
        self.query_one("#done-exports", Static).update(f"Exporting step {info.step} for {fmt}…")
        self.export(info.path, info.step, fmt)

    @work(thread=True, exclusive=True, exit_on_error=False, group="export")
    def export(self, checkpoint: Path, step: int, fmt: str) -> tuple[int, str, Path]:
        from engine.export import export_checkpoint
        from tui.mlx_thread import run_on_mlx_thread

        target = export_path(self.output_dir, step, fmt)
        return step, fmt, run_on_mlx_thread(lambda: export_checkpoint(checkpoint, fmt, target))

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group != "export":
            return
        box = self.query_one("#done-exports", Static)
        if event.state == WorkerState.SUCCESS:
            step, fmt, path = event.worker.result
            self.exported[step] = path
            box.update(Text.assemble(("Exported ", "green"), f"step {step} for {fmt}: {path}"))
            log.info("exported step %s as %s to %s", step, fmt, path)
            self.show_selection()
        elif event.state == WorkerState.ERROR:
            from engine.errors import UserError

            error = event.worker.error
            text = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            log.error("export failed", exc_info=error)
            box.update(Text.assemble(("Export failed: ", "red"), text))

    def action_quit_wizard(self) -> None:
        self.app.exit(0)
