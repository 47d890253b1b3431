"""Resume: the checkpoints of a training's output folder; Enter continues the chosen one.

A checkpoint holds the LoRA, the optimizer, the data order and the config, but
not the photos: its config points at them, so the list says whether they are
still there (resuming re-encodes them).
"""
from __future__ import annotations

import logging
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Label, Static

log = logging.getLogger(__name__)


def config_summary(config: dict) -> str:
    """'4 epochs · lr 0.0001 · rank 8 · 512x512 · 4-bit' from an mflux config dict."""
    loop = config.get("training_loop") or {}
    optimizer = config.get("optimizer") or {}
    ranks = sorted({spec.get("lora_rank") for spec in (config.get("lora_layers") or {}).values()
                    if isinstance(spec, dict) and spec.get("lora_rank") is not None})
    parts = [f"{loop.get('num_epochs', '?')} epochs", f"lr {optimizer.get('learning_rate', '?')}",
             f"rank {'/'.join(str(r) for r in ranks) or '?'}", f"{config.get('width', '?')}x{config.get('height', '?')}"]
    quantize = config.get("quantize")
    parts.append(f"{quantize}-bit" if quantize else "full precision")
    return " · ".join(parts)


class ResumeScreen(Screen):
    TITLE = "Resume"
    CSS_PATH = "resume.tcss"
    HELP = """\
A training writes a checkpoint every `checkpoint_frequency` steps, when you press **s**, and when
you stop it. Continuing from one gives exactly the run you would have had without stopping.

- Type the training's **output folder** (the one holding `_checkpoints/`) and press **Enter**.
- **↑/↓** choose a checkpoint, **Enter** continues it on the Train screen.
- *images* says whether the photos the checkpoint was trained on are still where its config
  says; resuming needs them (they are encoded again).
- **Esc** goes back to the welcome screen.
"""
    BINDINGS = [
        Binding("escape", "back", "Back"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.checkpoints: list = []

    def compose(self) -> ComposeResult:
        with Vertical(id="resume"):
            yield Label("Resume a training from a checkpoint", id="resume-title")
            yield Label("Output folder (holds _checkpoints/); Enter lists its checkpoints", classes="hint")
            yield Input(placeholder="e.g. ~/Desktop/my_dog_model", id="resume-folder")
            yield DataTable(id="resume-table", cursor_type="row", zebra_stripes=True)
            yield Static("", id="resume-detail")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#resume-table", DataTable)
        table.add_columns("step", "saved", "last loss", "model", "settings", "images")
        folder = self.app.state.output_dir
        field = self.query_one("#resume-folder", Input)
        if folder is not None:
            field.value = str(folder)
            self.list_folder(Path(folder))
        else:
            field.focus()

    @on(Input.Submitted, "#resume-folder")
    def _folder_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if text:
            self.list_folder(Path(text).expanduser())

    def list_folder(self, folder: Path) -> None:
        from engine.checkpoint import list_checkpoints

        table = self.query_one("#resume-table", DataTable)
        table.clear()
        detail = self.query_one("#resume-detail", Static)
        if not folder.is_dir():
            self.checkpoints = []
            detail.update(Text(f"{folder} is not a folder: type the training's output folder.", style="red"))
            return
        self.checkpoints = list(reversed(list_checkpoints(folder)))  # newest first: the usual choice
        if not self.checkpoints:
            detail.update(Text(f"No checkpoints in {folder} or its _checkpoints/ folder.", style="red"))
            self.query_one("#resume-folder", Input).focus()
            return
        self.app.state.output_dir = folder
        for info in self.checkpoints:
            loss = f"{info.last_loss:.4f}" if info.last_loss is not None else "-"
            images = Text("present", style="green") if info.images_present else Text("missing", style="red")
            table.add_row(str(info.step), f"{info.created:%Y-%m-%d %H:%M}", loss, info.model,
                          config_summary(info.config), images, key=str(info.path))
        table.focus()
        self._show_detail(0)

    @on(DataTable.RowHighlighted, "#resume-table")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail(event.cursor_row)

    def _show_detail(self, row: int) -> None:
        if not 0 <= row < len(self.checkpoints):
            return
        info = self.checkpoints[row]
        text = Text.assemble(("Checkpoint: ", "bold"), str(info.path))
        if not info.images_present:
            where = (info.config.get("examples") or {}).get("path", "?")
            text.append(f"\nIts training images are no longer in {where}: put them back to resume this one.",
                        style="red")
        else:
            text.append("\nEnter continues this training.")
        self.query_one("#resume-detail", Static).update(text)

    @on(DataTable.RowSelected, "#resume-table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        self.continue_from(event.cursor_row)

    def continue_from(self, row: int) -> None:
        if not 0 <= row < len(self.checkpoints):
            return
        info = self.checkpoints[row]
        if not info.images_present:
            self.app.bell()
            self._show_detail(row)
            return
        state = self.app.state
        state.resume_checkpoint = Path(info.path)
        state.model = info.model
        log.info("resuming from %s", info.path)
        self.app.goto("train")

    def action_back(self) -> None:
        self.app.goto("welcome")
