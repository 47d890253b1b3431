"""Train: the trainer runs in a thread; this screen watches it and steers it.

The training thread reports through `EventRelay` (post_message only: it never
waits for the screen), and the screen steers it through `TrainingControls`,
which the loop polls between steps. A thread cannot be killed: stopping means
asking the loop to finish its step and write a checkpoint.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Label, ProgressBar, RichLog, Static
from textual.worker import Worker, WorkerState

from engine.events import TrainingControls
from tui import messages
from tui.widgets.loss_plot import LossPlot
from tui.widgets.preview import Preview, PreviewViewer, find_previews
from tui.widgets.step_header import StepHeader

log = logging.getLogger(__name__)

PHASE_TITLES = {
    "load": "Loading the text encoders and VAE",
    "download": "Downloading the model",
    "load_transformer": "Loading the transformer",
    "encode": "Encoding images and prompts",
    "images": "Encoding images",
    "prompts": "Encoding prompts",
    "kernels": "Compiling GPU kernels (once per machine)",
    "compile": "Compiling the training step",
    "train": "Training",
}

STOP_WAIT_S = 600  # a FLUX.1 step plus a checkpoint on a slow machine

# (state, relay, controls) -> an object with run(); tests pass one that plays fixed events
TrainerFactory = Callable[[object, messages.EventRelay, TrainingControls], object]


def build_trainer(state, relay: messages.EventRelay, controls: TrainingControls):
    """The engine's Trainer for the wizard state: a checkpoint to resume, or the reviewed config."""
    from engine.config import load_config, parse_config
    from engine.trainer import Trainer

    if state.resume_checkpoint is not None:
        return Trainer.from_checkpoint(Path(state.resume_checkpoint), relay, controls)
    if state.config_path is not None and Path(state.config_path).is_file():
        # block limits are checked by the trainer against the model it loads (tiny has fewer blocks)
        config = load_config(state.config_path, num_joint_blocks=None, num_single_blocks=None)
    else:
        config = parse_config(state.config, Path.cwd(), num_joint_blocks=None, num_single_blocks=None)
    return Trainer(config, relay, controls)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


class TrainScreen(Screen):
    TITLE = "Train"
    CSS_PATH = "train.tcss"
    HELP = """\
Training runs in the background; the screen stays responsive.

- **p** pauses after the current step, and resumes.
- **s** writes a checkpoint after the current step (one is also written every
  `checkpoint_frequency` steps). A checkpoint is what *resume* continues from.
- **v** draws a preview with the validation prompt after the current step.
- **[** and **]** browse earlier previews.
- **q** stops: after a confirmation the current step finishes and a checkpoint is written,
  so nothing is lost; `dreambooth-wizard resume` continues later.
- **Enter** (once finished) shows the results: pick the checkpoint whose previews look best.

The loss is noisy by nature (every step draws a new noise level); the smoothed line shows
the trend. Judge by the previews, not by the loss: a LoRA trained too long copies the photos
(overfits) while its loss keeps falling.
"""
    BINDINGS = [
        Binding("p", "toggle_pause", "Pause"),
        Binding("s", "checkpoint", "Checkpoint"),
        Binding("v", "preview", "Preview"),
        Binding("left_square_bracket", "older_preview", "Browse", key_display="[ ]"),
        Binding("right_square_bracket", "newer_preview", "Newer", show=False),
        Binding("q", "stop", "Stop"),
        Binding("enter", "results", "Results"),
    ]

    def __init__(self, trainer_factory: TrainerFactory | None = None) -> None:
        super().__init__()
        self.trainer_factory = trainer_factory or build_trainer
        self.controls = TrainingControls()
        self.worker: Worker | None = None
        self.finished_event: dict | None = None
        self.error_shown = False
        self.stopping = False
        self.output_logged: Path | None = None
        self.thread_done = threading.Event()

    # -- layout -----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield StepHeader("train", id="step-header")
        with Horizontal(id="train-top"):
            with Vertical(id="train-stats"):
                yield Label("Starting…", id="train-status")
                yield ProgressBar(id="train-progress", show_eta=False)
                yield Static("", id="train-numbers")
            yield LossPlot(id="train-loss")
        with Horizontal(id="train-bottom"):
            yield PreviewViewer(id="train-preview")
            yield RichLog(id="train-log", wrap=True, markup=True, auto_scroll=True)
        yield Footer()

    def on_mount(self) -> None:
        self._show_numbers({})
        self.start_training()

    # -- the worker -------------------------------------------------------------------------------

    @property
    def training_running(self) -> bool:
        """Whether a training thread is alive (the app asks before quitting)."""
        return self.worker is not None and self.worker.state in (WorkerState.PENDING, WorkerState.RUNNING)

    def start_training(self) -> None:
        checkpoint = self.app.state.resume_checkpoint
        earlier: list[tuple[int, float]] = []
        if checkpoint is not None:
            # a resumed run shows its whole curve and its earlier previews, not only what comes next
            checkpoint = Path(checkpoint)
            from engine.checkpoint import read_loss_history  # imports MLX: not at the wizard's start

            earlier = read_loss_history(checkpoint)
            self._log(f"resuming from {checkpoint.name}")
            self.query_one("#train-loss", LossPlot).show_losses(earlier)
            step = earlier[-1][0] if earlier else None
            viewer = self.query_one("#train-preview", PreviewViewer)
            for preview in find_previews(checkpoint.parent.parent):
                if step is None or preview.step <= step:
                    viewer.add(preview)
        self.relay = messages.EventRelay(self, losses=earlier)
        self.worker = self.run_training()

    @work(thread=True, exclusive=True, exit_on_error=False, group="training")
    def run_training(self):
        from tui.mlx_thread import run_on_mlx_thread

        state, relay, controls = self.app.state, self.relay, self.controls
        try:
            return run_on_mlx_thread(lambda: self.trainer_factory(state, relay, controls).run())
        finally:
            self.thread_done.set()

    def stop_training(self) -> None:
        """Finish the current step, write a checkpoint, end the run (also used by the app's Ctrl+C)."""
        if self.training_running and not self.stopping:
            self.stopping = True
            self.controls.stop()
            self._set_status("Stopping: finishing the step and writing a checkpoint…")
            self._log("stop requested: a checkpoint is written at the current step")

    def on_unmount(self) -> None:
        # leaving the app (or this screen) must not leave a thread training on its own: the thread
        # finishes its step and writes a checkpoint; the process waits for it, or the checkpoint
        # would be lost (and MLX aborts when the interpreter exits under a running computation)
        if self.worker is not None and not self.thread_done.is_set():
            log.info("waiting for the training thread to stop")
            self.controls.stop()
            if not self.thread_done.wait(timeout=STOP_WAIT_S):
                log.error("the training thread did not stop within %s s", STOP_WAIT_S)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker is not self.worker:
            return
        self.refresh_bindings()
        if event.state == WorkerState.ERROR:
            self._show_failure(event.worker.error)
        elif event.state == WorkerState.SUCCESS and self.finished_event is None:
            result = event.worker.result
            self._finish({"step": getattr(result, "step", None), "stopped": getattr(result, "stopped", False),
                          "adapter_path": getattr(result, "adapter_path", None),
                          "checkpoint_path": getattr(result, "checkpoint_path", None)})

    def _show_failure(self, error: BaseException | None) -> None:
        from engine.errors import UserError
        from tui.widgets.error_dialog import ErrorDialog

        self._set_status("Training stopped with an error")
        if self.error_shown:
            return
        self.error_shown = True
        if isinstance(error, UserError):
            message, hint = error.message, error.hint
        else:
            log.error("training failed", exc_info=error)
            message = f"{type(error).__name__}: {error}"
            hint = "this looks like a bug; the log has the details. Your checkpoints so far are safe."
        self._log(f"[red]error:[/red] {message}")
        self.app.push_screen(ErrorDialog("Training stopped", message, hint, _log_file()))

    # -- engine events ----------------------------------------------------------------------------

    def on_training_phase(self, message: messages.TrainingPhase) -> None:
        phase = message.event.get("phase", "")
        title = PHASE_TITLES.get(phase, phase)
        self._set_status(f"{title}…" if phase != "train" else "Training")
        detail = message.event.get("detail")
        self._log(f"{title}{': ' + detail if detail else ''}")

    def on_training_progress(self, message: messages.TrainingProgress) -> None:
        event = message.event
        done, total = event.get("done", 0), event.get("total")
        self._show_progress(total, done)
        phase = PHASE_TITLES.get(event.get("phase", ""), event.get("phase", ""))
        if event.get("phase") == "download" and total:
            self._set_status(f"{phase}: {done / 1e9:.2f} of {total / 1e9:.2f} GB")
        elif total:
            self._set_status(f"{phase}: {done} of {total}")

    def on_training_step(self, message: messages.TrainingStep) -> None:
        event = message.event
        self._show_progress(event.get("total_steps"), event.get("step", 0))
        self._show_numbers(event)
        self.query_one("#train-loss", LossPlot).show_losses(message.losses)

    def on_preview_saved(self, message: messages.PreviewSaved) -> None:
        event = message.event
        self.query_one("#train-preview", PreviewViewer).add(Preview(int(event["step"]), Path(event["path"])))
        self._remember_output(Path(event["path"]).parent.parent.parent)
        self._log(f"preview at step {event['step']}: {Path(event['path']).name}")

    def on_checkpoint_saved(self, message: messages.CheckpointSaved) -> None:
        event = message.event
        self._remember_output(Path(event["path"]).parent.parent)
        self._log(f"[green]checkpoint[/green] at step {event['step']}: {self._short(event['path'])}")

    def on_plot_saved(self, message: messages.PlotSaved) -> None:
        log.info("loss plot at step %s: %s", message.event.get("step"), message.event.get("path"))

    def on_training_paused(self, message: messages.TrainingPaused) -> None:
        self._set_status(f"Paused at step {message.event.get('step')}: p resumes")
        self._log(f"paused at step {message.event.get('step')}")

    def on_training_resumed(self, message: messages.TrainingResumed) -> None:
        self._set_status("Training")
        self._log(f"resumed at step {message.event.get('step')}")

    def on_training_warning(self, message: messages.TrainingWarning) -> None:
        self._log(f"[yellow]warning:[/yellow] {message.event.get('message')}")

    def on_training_error(self, message: messages.TrainingError) -> None:
        from tui.widgets.error_dialog import ErrorDialog

        event = message.event
        self._set_status("Training stopped with an error")
        self._log(f"[red]error:[/red] {event.get('message')}")
        if not self.error_shown:
            self.error_shown = True
            self.app.push_screen(ErrorDialog("Training stopped", str(event.get("message")), event.get("hint"),
                                             _log_file()))

    def on_training_finished(self, message: messages.TrainingFinished) -> None:
        self._finish(message.event)

    def _finish(self, event: dict) -> None:
        self.finished_event = event
        step = event.get("step")
        if event.get("stopped"):
            self._set_status(f"Stopped at step {step}")
            self._log(f"stopped at step {step}; checkpoint {self._short(event.get('checkpoint_path'))}")
        else:
            self._set_status(f"Finished at step {step}")
            self._log(f"[green]finished[/green]: LoRA {self._short(event.get('adapter_path'))}")
        self._log("Enter shows the results: pick the checkpoint whose previews look best")
        self.refresh_bindings()

    # -- keys -------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("toggle_pause", "checkpoint", "preview", "stop"):
            if self.finished_event is not None:
                return False  # the run is over: these keys leave the footer
            return True if self.training_running else None
        if action == "results":
            return self.finished_event is not None
        return True

    def action_toggle_pause(self) -> None:
        if not self.training_running or self.stopping:
            return
        if self.controls.toggle_pause():
            self._set_status("Pausing after this step…")
        else:
            self._set_status("Resuming…")

    def action_checkpoint(self) -> None:
        if self.training_running:
            self.controls.request_checkpoint()
            self._log("checkpoint requested: written after this step")

    def action_preview(self) -> None:
        if self.training_running:
            self.controls.request_preview()
            self._log("preview requested: drawn after this step")

    def action_older_preview(self) -> None:
        self.query_one("#train-preview", PreviewViewer).show_older()

    def action_newer_preview(self) -> None:
        self.query_one("#train-preview", PreviewViewer).show_newer()

    def action_stop(self) -> None:
        from tui.widgets.confirm import ConfirmDialog

        if not self.training_running or self.stopping:
            return
        question = ("Stop the training?\nThe current step finishes and a checkpoint is written, "
                    "so you can resume later.")
        self.app.push_screen(ConfirmDialog(question, yes="Stop", no="Keep training"),
                             lambda confirmed: self.stop_training() if confirmed else None)

    def action_results(self) -> None:
        if self.finished_event is not None:
            self.app.goto("done")

    # -- helpers ----------------------------------------------------------------------------------

    def _remember_output(self, folder: Path) -> None:
        # the trainer may have added a timestamp to the configured folder: the event paths are the truth
        if self.output_logged != folder:
            self.app.state.output_dir = self.output_logged = folder
            self._log(f"output folder: {folder}")

    def _short(self, path: str) -> str:
        """A path inside the output folder, written relative to it (the folder is logged once)."""
        try:
            return str(Path(path).relative_to(self.app.state.output_dir))
        except (TypeError, ValueError):
            return str(path)

    def _show_progress(self, total: int | None, done: int) -> None:
        # hidden while nothing is counted: an unknown total would animate for nothing
        bar = self.query_one("#train-progress", ProgressBar)
        bar.display = bool(total)
        if total:
            bar.update(total=total, progress=done)

    def _set_status(self, text: str) -> None:
        self.query_one("#train-status", Label).update(text)

    def _log(self, text: str) -> None:
        self.query_one("#train-log", RichLog).write(text)
        log.info("%s", text)

    def _show_numbers(self, event: dict) -> None:
        def value(key: str, fmt: str) -> str:
            return fmt.format(event[key]) if event.get(key) is not None else "-"

        step = f"{event['step']} / {event['total_steps']}" if "step" in event else "-"
        compiling = " (GPU kernels compiling)" if event.get("uncompiled") else ""
        epoch = f"{event['epoch']} / {event['num_epochs']}" if "epoch" in event else "-"
        lines = [
            f"step      {step}",
            f"epoch     {epoch}",
            f"loss      {value('loss', '{:.4f}')}",
            # uncompiled steps, while this machine compiles its GPU kernels once (engine/trainer.py)
            f"speed     {value('it_per_s', '{:.2f} it/s')}{compiling}",
            f"ETA       {format_duration(event.get('eta_s')) if 'step' in event else '-'}",
            f"peak mem  {value('peak_memory_gib', '{:.2f} GiB')}",
        ]
        self.query_one("#train-numbers", Static).update("\n".join(lines))


def _log_file() -> str | None:
    """The wizard's log file (tui.commands.wizard sets it up), if logging goes there."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename.endswith("wizard.log"):
            return handler.baseFilename
    return None
