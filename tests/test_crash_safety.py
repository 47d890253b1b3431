"""A run killed with SIGKILL at any moment leaves only whole checkpoints, and the newest is the last one written.

One training folder serves every trial: each trial resumes the newest
checkpoint in a fresh `python -m tui.cli train` process (checkpoint every
step), and kills it after a seeded random delay, or just as a checkpoint's
temporary file appears, so some kills land mid-write.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlx.utils import tree_unflatten

from engine.checkpoint import PARTIAL_SUFFIX, list_checkpoints, read_checkpoint
from engine.config import lora_targets, parse_config
from engine.dataset import BatchIterator
from engine.events import TrainingControls
from engine.export import adapter_from_bytes
from engine.trainer import Trainer
from tests.helpers import make_training_folder

REPO = Path(__file__).resolve().parents[1]
TRIALS = 20
SEED = 20240611


class KilledRun:
    """A training subprocess whose JSON events are collected as they arrive."""

    def __init__(self, *source: str):
        self.process = subprocess.Popen([sys.executable, "-m", "tui.cli", "train", *source, "--json"], cwd=REPO,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.events: list[dict] = []
        self.first_step = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:  # the line the kill cut short
                continue
            self.events.append(event)
            if event["type"] == "step":
                self.first_step.set()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.reader.join(30)

    def steps(self, kind: str) -> list[int]:
        return [event["step"] for event in self.events if event["type"] == kind]


def partials(folder: Path) -> set[Path]:
    return set(folder.glob(f"*{PARTIAL_SUFFIX}")) if folder.is_dir() else set()


def wait_for_new_partial(folder: Path, known: set[Path], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if partials(folder) - known:
            return True
        time.sleep(0.0005)
    return False


def step_of(path: Path) -> int:
    return int(path.name.split("_")[0])


def test_sigkill_at_random_moments_leaves_only_whole_checkpoints_and_the_newest_resumes(tmp_path):
    config = make_training_folder(tmp_path, count=1, size=64, training_loop={"num_epochs": 100000, "batch_size": 1},
                                  save={"checkpoint_frequency": 1},
                                  instrumentation={"plot_frequency": 100000, "generate_image_frequency": 100000,
                                                   "validation_prompt": "photo of sks toy"})
    folder = tmp_path / "out" / "_checkpoints"
    chance = random.Random(SEED)
    newest = None
    killed_mid_write = 0
    for trial in range(TRIALS):
        source = ("--train-checkpoint", str(newest)) if newest else ("--train-config", str(config))
        known = partials(folder)
        run = KilledRun(*source)
        try:
            assert run.first_step.wait(120), f"trial {trial}: no step came"  # startup is over
            if newest is None:  # the first trial writes at least one checkpoint to resume from
                while not run.steps("checkpoint") and run.process.poll() is None:
                    time.sleep(0.01)
            if trial % 2:
                wait_for_new_partial(folder, known, timeout=5.0)
                time.sleep(chance.uniform(0.0, 0.02))  # somewhere inside the write
            else:
                time.sleep(chance.uniform(0.0, 1.2))
        finally:
            run.kill()
        assert run.process.returncode == -signal.SIGKILL, f"trial {trial}: the run ended by itself"

        started_at = step_of(newest) if newest else 0
        trained = run.steps("step")
        assert trained[0] == started_at + 1, f"trial {trial}: resumed at {trained[0]}, newest was {started_at}"
        announced = run.steps("checkpoint")
        zips = sorted(folder.glob("*_checkpoint.zip"), key=step_of)
        for path in zips:
            assert read_checkpoint(path).step == step_of(path), path  # every zip opens whole
        newest = zips[-1]
        if announced:  # the last write announced completed before the kill
            assert step_of(newest) >= announced[-1], (trial, announced, newest.name)
        assert step_of(newest) <= trained[-1], (trial, trained, newest.name)  # none from the future
        assert step_of(newest) >= started_at
        left = partials(folder) - known
        killed_mid_write += bool(left)
        # a temporary file is never taken for a checkpoint
        assert [info.path for info in list_checkpoints(tmp_path / "out")] == zips

    assert killed_mid_write >= 1, "no kill landed inside a checkpoint write"

    zips = sorted(folder.glob("*_checkpoint.zip"), key=step_of)
    assert_each_zip_loads_for_resume(zips)
    controls = TrainingControls()
    steps = []

    def one_step(event):
        if event["type"] == "step":
            steps.append(event["step"])
            controls.stop()

    result = Trainer.from_checkpoint(zips[-1], one_step, controls).run()
    assert steps == [step_of(zips[-1]) + 1] and result.step == steps[0]


def assert_each_zip_loads_for_resume(zips: list[Path]) -> None:
    """What resume does with a zip, without re-encoding: adapter into the LoRA layers, optimizer state, iterator."""
    import mlx.core as mx

    from engine.flux.loading import load_model
    from engine.lora import apply_lora, load_lora_parameters, lora_parameters
    from engine.optimizers import build_optimizer

    first = read_checkpoint(zips[0])
    config = parse_config(first.config)
    transformer = load_model("tiny", text_encoders=False).transformer
    apply_lora(transformer, lora_targets(config), key=mx.random.key(0))
    expected = {key: value.shape for key, value in lora_parameters(transformer).items()}
    optimizer = build_optimizer(config.optimizer.name, config.optimizer.learning_rate)
    for path in zips:
        contents = read_checkpoint(path)
        adapter, _ = adapter_from_bytes(contents.adapter)
        assert {key: value.shape for key, value in adapter.items()} == expected, path
        load_lora_parameters(transformer, adapter)
        optimizer.state = tree_unflatten(list(contents.optimizer.items()))
        assert int(contents.optimizer["step"]) == contents.step
        iterator = BatchIterator.from_state(contents.iterator, len(config.examples.images), config.seed)
        assert iterator.num_iterations == contents.step == step_of(path)
        assert [entry["step"] for entry in contents.loss] == list(range(1, contents.step + 1))
        assert os.path.getsize(path) > 0
