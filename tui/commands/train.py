"""`dreambooth-wizard train`: headless training with mflux's flags.

Ctrl+C (SIGINT) or SIGTERM stops after the current step and writes a
checkpoint at that step, then exits 130 (SIGINT) or 143 (SIGTERM). A second
Ctrl+C within SECOND_PRESS_GRACE_S of the first (a bounce, an impatient double
tap) changes nothing; a later one stops at once without that checkpoint, and
says which steps are lost. `--json` prints every event as a JSON line.
"""
from __future__ import annotations

import _thread
import argparse
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

SECOND_PRESS_GRACE_S = 1.5
STOPPING = "stopping after this step and saving a checkpoint; press Ctrl+C again to stop without saving"
STOPPING_BEFORE_TRAINING = "stopping once loading ends; press Ctrl+C again to stop now"


def add_parser(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--train-config", metavar="CONFIG.json", help="an mflux DreamBooth training config")
    source.add_argument("--train-checkpoint", metavar="CHECKPOINT.zip", help="resume from a checkpoint zip")
    parser.add_argument("--json", action="store_true", help="print events as JSON lines instead of a progress bar")


def run(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.events import TrainingControls
    from engine.trainer import Trainer

    controls = TrainingControls()
    listener = JsonLines() if args.json else ProgressDisplay()
    if args.train_checkpoint:
        trainer = Trainer.from_checkpoint(Path(args.train_checkpoint), listener, controls)
    else:
        trainer = Trainer(load_config(args.train_config), listener, controls)
    return run_training_headless(trainer, controls, listener)


def run_training_headless(trainer, controls, listener) -> int:
    """Run with signal handling; returns the exit code."""
    progress = trainer.callback = RunProgress(listener, getattr(trainer, "resume_from", None))
    stopper = StopOnSignal(controls, progress, say=lambda text: print(text, file=sys.stderr, flush=True))
    try:
        with signals_seen_as_they_arrive(stopper), listener:
            result = trainer.run()
    except KeyboardInterrupt:  # a late second Ctrl+C: the run is abandoned where it was
        print(progress.what_was_lost(), file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    if stopper.first_signal:
        return 128 + stopper.first_signal
    return 0 if not result.stopped else 130


class RunProgress:
    """Passes the trainer's events on to `listener`, keeping what a stop without saving must name."""

    def __init__(self, listener, resumed_from: Path | None = None):
        self.listener = listener
        self.resumed_from = resumed_from
        self.training = False  # the "train" phase began
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.checkpoint: tuple[int, str] | None = None  # the last one this run wrote: (step, path)

    def __call__(self, event: dict) -> None:
        kind = event["type"]
        if kind == "phase" and event.get("phase") == "train":
            self.training = True
        elif kind == "step":
            self.first_step = event["step"] if self.first_step is None else self.first_step
            self.last_step = event["step"]
        elif kind == "checkpoint":
            self.checkpoint = (event["step"], event["path"])
        self.listener(event)

    def what_was_lost(self) -> str:
        """The message for a run stopped without its last checkpoint: which steps are lost, where to resume."""
        saved = self.checkpoint
        if saved is None and self.resumed_from is not None and self.first_step is not None:
            saved = (self.first_step - 1, str(self.resumed_from))
        if self.last_step is None:
            resume = f"\n  -> resume with: {resume_command(self.resumed_from)}" if self.resumed_from else ""
            return f"stopped before the first training step; nothing was lost{resume}"
        if saved is None:
            return (f"stopped without saving: {_steps(1, self.last_step)} lost, no checkpoint was written yet\n"
                    "  -> train again; a checkpoint is written every save.checkpoint_frequency steps")
        step, path = saved
        resume = f"\n  -> resume with: {resume_command(path)}"
        if step >= self.last_step:
            return f"stopped; nothing was lost: the checkpoint at step {step} is {path}{resume}"
        return (f"stopped without saving: {_steps(step + 1, self.last_step)} lost; the last checkpoint is at "
                f"step {step}: {path}{resume}")


def resume_command(checkpoint: str | Path) -> str:
    return f"dreambooth-wizard train --train-checkpoint {shlex.quote(str(checkpoint))}"


def _steps(first: int, last: int) -> str:
    return f"step {last} is" if first == last else f"steps {first}-{last} are"


class StopOnSignal:
    """What Ctrl+C and SIGTERM do during a headless run.

    The first signal stops the run after its current step, with a checkpoint (TrainingControls.stop). A second
    Ctrl+C within SECOND_PRESS_GRACE_S is the same press; a later one abandons the run: KeyboardInterrupt in the
    main thread, so the checkpoint is not waited for. `heard` is called as each signal arrives (by the thread of
    `signals_seen_as_they_arrive`); `on_signal` is the handler Python calls in the main thread."""

    def __init__(self, controls, progress: RunProgress, say, clock=time.monotonic, interrupt=_thread.interrupt_main):
        self.controls = controls
        self.progress = progress
        self.say = say
        self.clock = clock
        self.interrupt = interrupt
        self.first_signal: int | None = None
        self.first_heard_at = 0.0
        self.abandoned = False
        self._interrupted = False
        self._told_same_press = False

    def heard(self, signum: int) -> None:
        now = self.clock()
        if self.first_signal is None:
            self.first_signal, self.first_heard_at = signum, now
            self.controls.stop()
            self.say(STOPPING if self.progress.training else STOPPING_BEFORE_TRAINING)
        elif signum != signal.SIGINT or self.abandoned:
            return
        elif now - self.first_heard_at < SECOND_PRESS_GRACE_S:
            if not self._told_same_press:
                self._told_same_press = True
                self.say("still stopping and saving (a second Ctrl+C this soon counts as the same press)")
        else:
            self.abandoned = True
            self.say("stopping now, without saving")
            self.interrupt()  # runs on_signal in the main thread, which raises there

    def on_signal(self, signum, frame) -> None:
        if self.abandoned and not self._interrupted:
            self._interrupted = True
            raise KeyboardInterrupt


@contextmanager
def signals_seen_as_they_arrive(stopper: StopOnSignal):
    """SIGINT and SIGTERM reach `stopper.heard` the moment they arrive, through Python's wakeup fd.

    Python runs a signal handler in the main thread only between bytecodes, which can be seconds apart while
    MLX computes a step: then a first Ctrl+C would go unanswered, and two presses a moment apart could be handled
    seconds apart. A thread reading the wakeup fd sees each signal as it comes (MLX releases the GIL)."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = {sig: signal.signal(sig, stopper.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_pass_signals_on, args=(read_end, stopper), daemon=True,
                               name="signal-watcher")
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.write(write_end, b"\0")  # no signal has number 0: the watcher's cue to end
        watcher.join(5)
        os.close(write_end)
        os.close(read_end)


def _pass_signals_on(read_end: int, stopper: StopOnSignal) -> None:
    while True:
        try:
            arrived = os.read(read_end, 64)
        except OSError:
            return
        for signum in arrived:
            if signum == 0:
                return
            try:
                stopper.heard(signum)
            except Exception:  # one failed message must not leave later signals unheard
                log.exception("handling signal %d failed", signum)


class JsonLines:
    def __call__(self, event: dict) -> None:
        print(json.dumps(event, default=str), flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class ProgressDisplay:
    """A rich progress bar (step, loss, it/s, ETA) and a line per checkpoint and preview."""

    def __init__(self):
        from rich.console import Console

        # soft wrap: a long path stays one line the terminal wraps, so it can be copied whole
        self.console = Console(stderr=False, soft_wrap=True)
        self.progress = None
        self.task = None

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"),
                                 TimeRemainingColumn(), console=self.console, transient=False)
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        return False

    def __call__(self, event: dict) -> None:
        from rich.markup import escape  # paths and messages may hold [brackets] that rich would take for markup

        kind = event["type"]
        say = self.progress.console.print
        if kind == "phase":
            say(f"[dim]{escape(event['phase'])}: {escape(str(event.get('detail', '')))}[/dim]")
            if event["phase"] == "train" and self.task is None:
                self.task = self.progress.add_task("training", total=None, loss="-", speed="")
        elif kind == "step":
            if self.task is None:
                self.task = self.progress.add_task("training", total=None, loss="-", speed="")
            self.progress.update(self.task, completed=event["step"], total=event["total_steps"],
                                 description=f"epoch {event['epoch']}/{event['num_epochs']}",
                                 loss=f"{event['loss']:.4f}", speed=f"{event['it_per_s']:.2f} it/s"
                                 + (" (GPU kernels compiling)" if event.get("uncompiled") else ""))
        elif kind == "checkpoint":
            say(f"checkpoint at step {event['step']}: {escape(event['path'])}")
        elif kind == "preview":
            say(f"preview at step {event['step']}: {escape(event['path'])}")
        elif kind == "warning":
            say(f"[yellow]warning:[/yellow] {escape(event['message'])}")
        elif kind == "paused":
            say("paused")
        elif kind == "finished":
            if event.get("stopped"):
                say(f"stopped at step {event['step']}; resume with: {escape(resume_command(event['checkpoint_path']))}")
            else:
                say(f"done: LoRA {escape(str(event['adapter_path']))}")
        elif kind == "error":
            pass  # the CLI prints the error once, from the exception


