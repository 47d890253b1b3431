"""Memory: will this run fit this machine? The estimate as a bar and a table, and one-key fixes."""
from __future__ import annotations

import logging

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, Label, Static

from tui.screens.step import StepScreen
from tui.widgets.memory_bar import GIB, MemoryBar

log = logging.getLogger(__name__)

FIX_KEYS = ("8", "4", "g", "r", "b", "l", "a")


class MemoryEstimated(Message):
    def __init__(self, inputs=None, estimate=None, fixes=(), available: int = 0, problem: str = "") -> None:
        self.inputs = inputs
        self.estimate = estimate
        self.fixes = list(fixes)
        self.available = available
        self.problem = problem
        super().__init__()


class MemoryScreen(StepScreen):
    STEP = "memory"
    BACK = "template"
    NEXT = "review"
    TITLE = "Memory"
    CSS_PATH = "memory.tcss"
    HELP = """\
Before anything is downloaded or loaded, the wizard estimates the **peak memory** of the run:
the frozen model weights (smaller when quantized), the LoRA weights, their gradients and the
optimizer state, the activations of a training step (much smaller with gradient checkpointing),
and, while photos and prompts are encoded once at the start, the text encoders and the VAE.

It is compared with what this machine has for training: unified memory on a Mac, the card's
memory on NVIDIA, RAM on a CPU. The estimate is an estimate: leave some room.

When it does not fit, each fix is listed with the estimate it would give; press its **key** to
apply it (the template values change too): **4**/**8** quantize, **g** gradient checkpointing,
**r** halve the rank, **b** fewer blocks, **l** lower resolution, **a** all that is needed.
**Ctrl+N** goes on to the review, **Esc** back.
"""
    BINDINGS = [Binding(key, f"apply_fix('{key}')", f"Fix {key}", show=False) for key in FIX_KEYS]

    def __init__(self) -> None:
        super().__init__()
        self.inputs = None
        self.estimate = None
        self.available = 0
        self.fixes = []
        self.failure = ""

    def compose_body(self) -> ComposeResult:
        with Vertical(id="memory-main"):
            yield Static("Estimating…", id="memory-summary")
            yield MemoryBar(id="memory-bar")
            with Horizontal(id="memory-columns"):
                with Vertical(id="memory-breakdown"):
                    yield Label("Where the memory goes (GiB)", classes="section-title")
                    yield DataTable(id="memory-table", cursor_type="none", zebra_stripes=True)
                with Vertical(id="memory-fixes-box"):
                    yield Label("Fixes", classes="section-title")
                    yield Static("", id="memory-fixes")

    def on_mount(self) -> None:
        table = self.query_one("#memory-table", DataTable)
        table.add_column("Part", key="part", width=22)
        table.add_column("GiB", key="gib", width=7)
        table.add_column("Phase", key="phase", width=9)
        self.estimate_run()

    @work(thread=True, exclusive=True, exit_on_error=False, group="estimate")
    def estimate_run(self) -> None:
        from engine.errors import UserError
        from engine.memory import estimate_memory, inputs_for_run
        from engine.memory_fixes import suggest_fixes
        from tui.screens.config_builder import build_config

        state = self.app.state
        try:
            machine = self.app.machine
            cfg = build_config(state)
            available = machine.available_for_training
            inputs = inputs_for_run(cfg, machine)
            estimate = estimate_memory(inputs)
            fixes = suggest_fixes(inputs, available) if not estimate.fits(available) else []
        except UserError as error:
            self.post_message(MemoryEstimated(problem=str(error)))
            return
        self.post_message(MemoryEstimated(inputs, estimate, fixes, available))

    def on_memory_estimated(self, message: MemoryEstimated) -> None:
        summary = self.query_one("#memory-summary", Static)
        self.failure = message.problem
        if message.problem:
            summary.update(f"✗ The estimate failed: {message.problem}\nGo back (Esc) and check the template values.")
            return
        self.inputs, self.estimate, self.fixes, self.available = (message.inputs, message.estimate, message.fixes,
                                                                  message.available)
        machine = self.app.machine
        estimate = message.estimate
        summary.update(f"{machine.name}: {message.available / GIB:.1f} GiB for training. Peak while encoding "
                       f"{estimate.encoding_peak / GIB:.1f} GiB, while training {estimate.training_peak / GIB:.1f} GiB.")
        self.query_one("#memory-bar", MemoryBar).show(estimate.peak, message.available)
        table = self.query_one("#memory-table", DataTable)
        table.clear()
        for name, gib, phase in estimate.describe():
            table.add_row(name, gib, phase)
        self.show_fixes()
        self.refresh_bindings()

    def show_fixes(self) -> None:
        box = self.query_one("#memory-fixes", Static)
        if self.estimate.fits(self.available):
            spare = (self.available - self.estimate.peak) / GIB
            from engine.memory import HELD_BACK_NOTE

            held = f"\n{HELD_BACK_NOTE}" if self.estimate.details.get("held_back_to_fit") else ""
            box.update(f"✓ Fits, with {spare:.1f} GiB to spare. Nothing to change.{held}")
            return
        if not self.fixes:
            box.update("✗ Does not fit, and no setting the wizard knows lowers it enough. Use a machine with "
                       "more memory, or fewer photos and a smaller resolution.")
            return
        lines = ["✗ Does not fit. Press a key to apply a fix:"]
        for fix in self.fixes:
            mark = "✓ fits" if fix.fits else "still too much"
            lines.append(f"[b]{fix.key}[/b]  {fix.label}: {fix.estimate.peak / GIB:.1f} GiB, {mark}")
        box.update("\n".join(lines))

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "apply_fix":
            return any(fix.key == parameters[0] for fix in self.fixes)
        return True

    def action_apply_fix(self, key: str) -> None:
        from tui.screens.config_builder import build_config
        from tui.screens.images import refit_crops
        from tui.screens.memory_fixes import apply_fix
        from tui.screens.step import training_size

        fix = next((fix for fix in self.fixes if fix.key == key), None)
        if fix is None or self.inputs is None:
            return
        state = self.app.state
        if not state.config:
            from engine.config import config_to_dict

            state.config = config_to_dict(build_config(state), absolute_paths=True)
        old_size = training_size(state)
        state.config = apply_fix(state.config, self.inputs, fix.inputs)
        if training_size(state) != old_size:
            refit_crops(state.usable_images, *training_size(state))
        log.info("memory fix %s applied: %s", key, fix.label)
        self.notify(f"Applied: {fix.label}")
        self.query_one("#memory-summary", Static).update("Estimating…")
        self.estimate_run()

    def problems(self) -> list[str]:
        if self.failure:
            return [f"The run cannot be estimated: {self.failure.splitlines()[0]} Go back (Esc) and fix it."]
        return []

    def action_next(self) -> None:
        if self.estimate is not None and not self.estimate.fits(self.available):
            from tui.widgets.confirm import ConfirmDialog

            question = (f"The estimate ({self.estimate.peak / GIB:.1f} GiB) is above the "
                        f"{self.available / GIB:.1f} GiB this machine has for training. The run may fail or "
                        "swap. Go on anyway?")
            self.app.push_screen(ConfirmDialog(question, yes="Go on", no="Stay"),
                                 lambda go_on: super(MemoryScreen, self).action_next() if go_on else None)
            return
        super().action_next()
