"""`dreambooth-wizard train`: headless training with mflux's flags.

Ctrl+C (SIGINT) or SIGTERM stops after the current step and writes a
checkpoint at that step, then exits 130 (SIGINT) or 143 (SIGTERM); a second
Ctrl+C abandons the step. `--json` prints every event as a JSON line.
"""
from __future__ import annotations

import argparse
import json
import shlex
import signal
from pathlib import Path


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
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        controls.stop()
        # a second Ctrl+C really interrupts (no checkpoint for the unfinished step)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with listener:
            result = trainer.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        return 128 + received[0]
    return 0 if not result.stopped else 130


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
                                 loss=f"{event['loss']:.4f}", speed=f"{event['it_per_s']:.2f} it/s")
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
                say(f"stopped at step {event['step']}; resume with: dreambooth-wizard train "
                    f"--train-checkpoint {escape(shlex.quote(str(event['checkpoint_path'])))}")
            else:
                say(f"done: LoRA {escape(str(event['adapter_path']))}")
        elif kind == "error":
            pass  # the CLI prints the error once, from the exception


