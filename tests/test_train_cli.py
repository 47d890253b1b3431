"""`dreambooth-wizard train` headless: progress, JSON events, resume, Ctrl+C, and every kind of bad input.

Bad input runs as a real subprocess (`python -m tui.cli`), as a user would meet
it: one message on stderr naming the problem and the fix, exit code 2, no
traceback, and no file that existed before touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from engine.checkpoint import read_checkpoint
from engine.config import load_config
from engine.events import TrainingControls
from engine.trainer import Trainer
from tests.helpers import make_training_folder
from tui.cli import main

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def json_events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def small_folder(folder: Path, **overrides) -> Path:
    """One or two 64-pixel images, a few steps, everything else quiet."""
    settings = dict(count=1, size=64, training_loop={"num_epochs": 2, "batch_size": 1},
                    save={"checkpoint_frequency": 1},
                    instrumentation={"plot_frequency": 100, "generate_image_frequency": 100,
                                     "validation_prompt": "photo of sks toy"})
    return make_training_folder(folder, **{**settings, **overrides})


def edit_config(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under folder: (content hash, modification time)."""
    return {str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def earlier_run(config: Path) -> None:
    """Files a previous run left in the output folder; a refused run must not touch them."""
    out = Path(json.loads(config.read_text())["save"]["output_path"])
    (out / "_checkpoints").mkdir(parents=True)
    (out / "adapter.safetensors").write_bytes(b"an earlier adapter")
    (out / "_checkpoints" / "0000001_checkpoint.zip").write_bytes(b"an earlier checkpoint")


def assert_refused(result: subprocess.CompletedProcess, *words: str) -> str:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, output
    assert result.stderr.startswith("error: ") and result.stderr.count("error:") == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)
    return result.stderr


# ---------------------------------------------------------------- runs that work


def test_train_config_runs_to_the_end_with_a_progress_bar(tmp_path, capsys):
    # brackets (rich markup) and a long name (rich wraps at 80 columns) must not change the paths shown
    folder = tmp_path / "[my photos] of the dog from the summer holidays at the lake"
    config = small_folder(folder, count=2, training_loop={"num_epochs": 1, "batch_size": 1})
    assert main(["train", "--train-config", str(config)]) == 0
    shown = capsys.readouterr().out
    assert "train: 2 steps" in shown
    assert "2/2" in shown and "loss " in shown and "it/s" in shown  # the bar's last state
    for step in (1, 2):
        assert f"checkpoint at step {step}: {folder / 'out' / '_checkpoints' / f'000000{step}_checkpoint.zip'}\n" in shown
    assert f"done: LoRA {folder / 'out' / 'adapter.safetensors'}\n" in shown
    assert (folder / "out" / "adapter.safetensors").is_file()


def test_a_stopped_run_says_how_to_resume_in_a_line_that_pastes(capsys):
    from tui.commands.train import ProgressDisplay

    path = "/photos/[dog] summer/out/_checkpoints/0000007_checkpoint.zip"
    with ProgressDisplay() as display:
        display({"type": "warning", "message": "examples.images[0].prompt: [sks] missing"})
        display({"type": "finished", "step": 7, "stopped": True, "checkpoint_path": path, "adapter_path": None})
    shown = capsys.readouterr().out
    assert "warning: examples.images[0].prompt: [sks] missing\n" in shown
    assert f"stopped at step 7; resume with: dreambooth-wizard train --train-checkpoint '{path}'\n" in shown


def test_json_prints_one_event_per_line(tmp_path):
    config = small_folder(tmp_path, count=2, training_loop={"num_epochs": 2, "batch_size": 1},
                          save={"checkpoint_frequency": 2})
    result = cli("train", "--train-config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    events = json_events(result.stdout)  # every line parses
    kinds = [event["type"] for event in events]
    assert {"phase", "step", "checkpoint", "finished"} <= set(kinds)
    assert [e["phase"] for e in events if e["type"] == "phase"][-1] == "train"
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(e["total_steps"] == 4 and np.isfinite(e["loss"]) and e["it_per_s"] > 0 for e in steps)
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2, 4]
    assert kinds[-1] == "finished" and kinds.count("finished") == 1
    finished = events[-1]
    assert finished["step"] == 4 and finished["stopped"] is False
    assert Path(finished["adapter_path"]).is_file() and Path(finished["checkpoint_path"]).is_file()
    assert all(isinstance(e["time"], float) for e in events)


def test_train_checkpoint_resumes_to_the_same_adapter(tmp_path):
    config = small_folder(tmp_path, count=2, training_loop={"num_epochs": 2, "batch_size": 1})
    assert main(["train", "--train-config", str(config), "--json"]) == 0
    out = tmp_path / "out"
    straight = load_safetensors((out / "adapter.safetensors").read_bytes())

    result = cli("train", "--train-checkpoint", str(out / "_checkpoints" / "0000002_checkpoint.zip"), "--json")
    assert result.returncode == 0, result.stderr
    events = json_events(result.stdout)
    assert [e["step"] for e in events if e["type"] == "step"] == [3, 4]
    assert events[-1]["type"] == "finished" and events[-1]["step"] == 4
    resumed = load_safetensors((out / "adapter.safetensors").read_bytes())
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert np.array_equal(straight[key], resumed[key]), key


def test_sigint_writes_a_checkpoint_at_the_current_step_and_exits_130(tmp_path):
    config = small_folder(tmp_path, training_loop={"num_epochs": 500, "batch_size": 1},
                          save={"checkpoint_frequency": 1000})
    process = subprocess.Popen([sys.executable, "-m", "tui.cli", "train", "--train-config", str(config), "--json"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if json.loads(line)["type"] == "step":
                process.send_signal(signal.SIGINT)
                break
        rest, errors = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in errors, errors
    assert process.returncode == 130, errors
    events = json_events("".join(lines) + rest)
    finished = events[-1]
    assert finished["type"] == "finished" and finished["stopped"] is True
    stopped_at = finished["step"]
    assert stopped_at == max(e["step"] for e in events if e["type"] == "step") < 500
    # the only checkpoint is the one Ctrl+C asked for, at the step it stopped
    zips = sorted((tmp_path / "out" / "_checkpoints").glob("*.zip"))
    assert [z.name for z in zips] == [f"{stopped_at:07d}_checkpoint.zip"]
    assert finished["checkpoint_path"] == str(zips[0])
    contents = read_checkpoint(zips[0])
    assert contents.step == stopped_at and [e["step"] for e in contents.loss] == list(range(1, stopped_at + 1))
    assert not (tmp_path / "out" / "adapter.safetensors").exists()  # no final LoRA for an unfinished run

    controls = TrainingControls()
    steps = []

    def one_more_step(event):
        if event["type"] == "step":
            steps.append(event["step"])
            controls.stop()

    result = Trainer.from_checkpoint(zips[0], one_more_step, controls).run()
    # the stop came while the next step was already queued (one in flight): that one finishes too
    assert steps == [stopped_at + 1, stopped_at + 2] and result.step == stopped_at + 2


def test_ctrl_c_twice_quickly_still_saves_the_checkpoint(tmp_path):
    # a keyboard bounce or an impatient double tap used to abandon the run: every step since the last checkpoint lost
    config = small_folder(tmp_path, training_loop={"num_epochs": 500, "batch_size": 1},
                          save={"checkpoint_frequency": 1000})
    process = subprocess.Popen([sys.executable, "-m", "tui.cli", "train", "--train-config", str(config), "--json"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [said.put(line) for line in process.stderr], daemon=True)
    reader.start()
    errors = []
    try:
        for line in process.stdout:
            if json.loads(line)["type"] == "step":
                process.send_signal(signal.SIGINT)
                break
        while "press Ctrl+C again" not in line:  # the first press is answered at once
            line = said.get(timeout=60)
            errors.append(line)
        process.send_signal(signal.SIGINT)  # a moment later
        rest = process.stdout.read()
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(10)
    errors += list(said.queue)
    stderr = "".join(errors)
    assert "stopping after this step and saving a checkpoint; press Ctrl+C again to stop without saving" in stderr
    assert "Traceback" not in stderr and "without saving:" not in stderr, stderr
    assert process.returncode == 130, stderr
    finished = json_events(rest)[-1]
    assert finished["type"] == "finished" and finished["stopped"] is True
    zips = sorted((tmp_path / "out" / "_checkpoints").glob("*.zip"))
    assert [z.name for z in zips] == [f"{finished['step']:07d}_checkpoint.zip"]
    assert read_checkpoint(zips[0]).step == finished["step"]


class ScriptedRun:
    """A trainer that reports steps 1-5 with a checkpoint at 3, then is sent Ctrl+C twice (real signals)."""

    def __init__(self, controls: TrainingControls, abandoned: bool):
        self.controls = controls
        self.abandoned = abandoned  # whether the second press is to abandon the run (then wait for it)
        self.callback = None
        self.resume_from = None
        self.interrupted = False

    def run(self):
        self.callback({"type": "phase", "phase": "train"})
        for step in range(1, 6):
            self.callback({"type": "step", "step": step})
            if step == 3:
                self.callback({"type": "checkpoint", "step": 3, "path": CHECKPOINT_SHOWN})
        os.kill(os.getpid(), signal.SIGINT)
        wait_until(lambda: self.controls.stop_requested)
        os.kill(os.getpid(), signal.SIGINT)
        try:
            wait_until(lambda: not self.abandoned)  # an abandoning press interrupts this wait
        except KeyboardInterrupt:
            self.interrupted = True
            raise
        return SimpleNamespace(stopped=True)


CHECKPOINT_SHOWN = "/runs/[dog] out/_checkpoints/0000003_checkpoint.zip"


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "waited in vain"
        time.sleep(0.01)


class Listener(list):
    def __call__(self, event):
        self.append(event)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_scripted(monkeypatch, grace_s: float) -> tuple[int, ScriptedRun]:
    from tui.commands import train

    monkeypatch.setattr(train, "SECOND_PRESS_GRACE_S", grace_s)
    controls = TrainingControls()
    trainer, listener = ScriptedRun(controls, abandoned=grace_s == 0), Listener()
    before = signal.getsignal(signal.SIGINT)  # pytest's own; ignored where the suite runs as a background job
    try:
        code = train.run_training_headless(trainer, controls, listener)
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt escaped: the run was abandoned without saying what was lost")
    assert signal.getsignal(signal.SIGINT) is before  # the handler the run found is back
    assert [e["step"] for e in listener if e["type"] == "step"] == [1, 2, 3, 4, 5]  # events still reach the listener
    return code, trainer


def test_a_second_ctrl_c_within_the_grace_period_is_the_same_press(monkeypatch, capsys):
    code, trainer = run_scripted(monkeypatch, grace_s=60.0)
    shown = capsys.readouterr().err
    assert code == 130 and not trainer.interrupted
    assert "press Ctrl+C again to stop without saving" in shown and "counts as the same press" in shown
    assert "without saving:" not in shown


def test_a_later_second_ctrl_c_stops_at_once_and_names_what_is_lost(monkeypatch, capsys):
    code, trainer = run_scripted(monkeypatch, grace_s=0.0)
    shown = capsys.readouterr().err
    assert code == 130 and trainer.interrupted
    assert "stopping now, without saving" in shown
    assert (f"stopped without saving: steps 4-5 are lost; the last checkpoint is at step 3: {CHECKPOINT_SHOWN}\n"
            f"  -> resume with: dreambooth-wizard train --train-checkpoint '{CHECKPOINT_SHOWN}'\n") in shown


def test_ctrl_c_presses_by_the_clock():
    from tui.commands.train import SECOND_PRESS_GRACE_S, RunProgress, StopOnSignal

    now, said, interrupts = [100.0], [], []
    progress = RunProgress(lambda event: None)
    controls = TrainingControls()
    stopper = StopOnSignal(controls, progress, said.append, clock=lambda: now[0], interrupt=lambda: interrupts.append(now[0]))
    stopper.heard(signal.SIGINT)  # still loading: nothing to save yet
    assert controls.stop_requested and said == ["stopping once loading ends; press Ctrl+C again to stop now"]
    now[0] += 0.05
    stopper.heard(signal.SIGINT)
    now[0] += SECOND_PRESS_GRACE_S * 0.9
    stopper.heard(signal.SIGINT)
    assert interrupts == [] and not stopper.abandoned and len(said) == 2  # "the same press" is said once
    stopper.on_signal(signal.SIGINT, None)  # Python's own call for each press does nothing until then
    now[0] += SECOND_PRESS_GRACE_S
    stopper.heard(signal.SIGINT)
    assert interrupts == [now[0]] and stopper.abandoned and said[-1] == "stopping now, without saving"
    with pytest.raises(KeyboardInterrupt):
        stopper.on_signal(signal.SIGINT, None)
    stopper.on_signal(signal.SIGINT, None)  # once: a third press must not interrupt the message about what is lost
    stopper.heard(signal.SIGINT)
    assert interrupts == [now[0]]

    # SIGTERM (a service manager) always saves; the exit code says which signal stopped the run
    terminated = StopOnSignal(TrainingControls(), progress, said.append, clock=lambda: now[0], interrupt=interrupts.append)
    terminated.heard(signal.SIGTERM)
    now[0] += 10 * SECOND_PRESS_GRACE_S
    terminated.heard(signal.SIGTERM)
    assert terminated.first_signal == signal.SIGTERM and not terminated.abandoned


def test_what_a_run_stopped_without_saving_lost():
    from tui.commands.train import RunProgress

    def after(*events, resumed_from=None) -> str:
        progress = RunProgress(lambda event: None, resumed_from)
        for event in events:
            progress(event)
        return progress.what_was_lost()

    train, step = {"type": "phase", "phase": "train"}, lambda n: {"type": "step", "step": n}
    assert after() == "stopped before the first training step; nothing was lost"
    assert after(train, step(1), step(2)) == ("stopped without saving: steps 1-2 are lost, no checkpoint was written yet\n"
                                              "  -> train again; a checkpoint is written every save.checkpoint_frequency steps")
    saved = {"type": "checkpoint", "step": 2, "path": "/o/0000002_checkpoint.zip"}
    assert after(train, step(1), step(2), saved).startswith(
        "stopped; nothing was lost: the checkpoint at step 2 is /o/0000002_checkpoint.zip\n  -> resume with: ")
    assert after(train, step(1), step(2), saved, step(3)).startswith(
        "stopped without saving: step 3 is lost; the last checkpoint is at step 2: /o/0000002_checkpoint.zip\n")
    resumed = after(train, step(41), step(42), resumed_from="/o/0000040_checkpoint.zip")
    assert resumed.startswith("stopped without saving: steps 41-42 are lost; the last checkpoint is at step 40: ")


# ---------------------------------------------------------------- bad configs


def change(folder: Path, how) -> Path:
    config = small_folder(folder)
    earlier_run(config)
    edit_config(config, how)
    return config


BAD_CONFIGS = {
    "missing required key": (lambda d: d.pop("steps"), ['steps: missing; add "steps"']),
    "missing section": (lambda d: d.pop("training_loop"), ['training_loop: missing; add the "training_loop" section']),
    "wrong type": (lambda d: d.update(seed="42x"), ['seed = "42x": must be a whole number', '"seed": 42']),
    "wrong type of section": (lambda d: d.update(optimizer=["AdamW"]), ["optimizer = ", "must be an object"]),
    "zero checkpoint frequency": (lambda d: d["save"].update(checkpoint_frequency=0),
                                  ["save.checkpoint_frequency = 0: must be at least 1"]),
    "negative preview frequency": (lambda d: d["instrumentation"].update(generate_image_frequency=-5),
                                   ["instrumentation.generate_image_frequency = -5: must be at least 1"]),
    "zero plot frequency": (lambda d: d["instrumentation"].update(plot_frequency=0),
                            ["instrumentation.plot_frequency = 0: must be at least 1"]),
    "single blocks beyond 38": (
        lambda d: d["lora_layers"]["single_transformer_blocks"]["block_range"].update(end=40),
        ["lora_layers.single_transformer_blocks.block_range.end = 40: FLUX.1 has 38 single blocks, use at most 38"]),
    "joint blocks beyond 19": (
        lambda d: d["lora_layers"].update(transformer_blocks={"block_range": {"start": 10, "end": 25},
                                                              "layer_types": ["attn.to_q"], "lora_rank": 4}),
        ["lora_layers.transformer_blocks.block_range.end = 25: FLUX.1 has 19 joint blocks, use at most 19"]),
    "block index beyond 38": (
        lambda d: d["lora_layers"]["single_transformer_blocks"].update(block_range={"indices": [0, 38]}),
        ["block_range.indices[1] = 38", "use 0 to 37"]),
    "unknown layer type": (
        lambda d: d["lora_layers"]["single_transformer_blocks"].update(layer_types=["attn.to_q", "attn.to_qv"]),
        ['layer_types[1] = "attn.to_qv": unknown layer type', "valid here:"]),
    "joint-only layer in single blocks": (
        lambda d: d["lora_layers"]["single_transformer_blocks"].update(layer_types=["ff.net.2"]),
        ['layer_types[0] = "ff.net.2"', "only transformer_blocks have this layer"]),
    "unknown optimizer": (lambda d: d["optimizer"].update(name="AdamX"),
                          ['optimizer.name = "AdamX": unknown optimizer', "valid: Adam, AdamW"]),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_bad_config_is_refused_with_one_message(tmp_path, case):
    how, words = BAD_CONFIGS[case]
    config = change(tmp_path, how)
    before = snapshot(tmp_path)
    message = assert_refused(cli("train", "--train-config", str(config)), str(config), *words)
    assert "1 problem(s)" in message
    assert snapshot(tmp_path) == before


def test_malformed_json_names_the_line(tmp_path):
    config = small_folder(tmp_path)
    earlier_run(config)
    config.write_text(config.read_text().replace('"seed": 42,', '"seed": 42,,'))
    before = snapshot(tmp_path)
    assert_refused(cli("train", "--train-config", str(config)), "not valid JSON at line 3", "'\"seed\": 42,,'",
                   "missing comma, quote or bracket")
    assert snapshot(tmp_path) == before


def test_several_problems_are_listed_together(tmp_path):
    config = change(tmp_path, lambda d: (d["save"].update(checkpoint_frequency=0), d["optimizer"].update(name="x")))
    message = assert_refused(cli("train", "--train-config", str(config)), "2 problem(s)",
                             "save.checkpoint_frequency = 0", 'optimizer.name = "x"')
    assert message.count("\n  - ") == 2


def test_a_config_that_does_not_exist(tmp_path):
    assert_refused(cli("train", "--train-config", str(tmp_path / "nope.json")), "nope.json: file not found")


# ---------------------------------------------------------------- bad images


def replace_image(config: Path, write) -> Path:
    path = config.parent / "images" / "00.png"
    write(path)
    return path


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def corrupted(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for offset in range(60, len(data) - 20, 7):  # inside the compressed pixels, header intact
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def not_an_image(path: Path) -> None:
    path.write_text("these are my holiday notes, not a photo\n")


def decompression_bomb(path: Path) -> None:
    """A valid PNG header claiming 12000 x 12000 pixels (more than Pillow's safety limit)."""
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 12000, 12000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


BAD_IMAGES = {
    "missing image": (lambda path: path.unlink(), ["examples.images[0].image", "no file at", "00.png", "check examples.path"]),
    "truncated image": (truncated, ["00.png is damaged or incomplete", "save it again"]),
    "corrupt image": (corrupted, ["00.png is damaged or incomplete", "save it again"]),
    "not an image": (not_an_image, ["00.png is not an image this program can read", "use JPEG, PNG"]),
    "decompression bomb": (decompression_bomb, ["00.png is too large to open safely", "downscale it"]),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_a_bad_image_is_refused_with_one_message(tmp_path, case):
    damage, words = BAD_IMAGES[case]
    config = small_folder(tmp_path, count=2)
    earlier_run(config)
    replace_image(config, damage)
    before = snapshot(tmp_path)
    assert_refused(cli("train", "--train-config", str(config)), *words)
    assert snapshot(tmp_path) == before


def test_a_tiny_image_trains_with_a_warning_naming_it(tmp_path):
    config = small_folder(tmp_path, count=2, training_loop={"num_epochs": 1, "batch_size": 1})
    replace_image(config, lambda path: Image.new("RGB", (12, 20), (200, 30, 30)).save(path))
    result = cli("train", "--train-config", str(config), "--json")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    events = json_events(result.stdout)
    warnings = [e["message"] for e in events if e["type"] == "warning" and "00.png" in e["message"]]
    assert len(warnings) == 1, warnings
    assert "12x12 pixels" in warnings[0] and "enlarged to 64x64" in warnings[0]
    assert not [e for e in events if e["type"] == "warning" and "01.png" in e["message"]]  # 64 pixels: fine
    assert events[-1]["type"] == "finished" and events[-1]["step"] == 2


@pytest.mark.parametrize("where", ["inside a file", "a file"])
def test_an_output_folder_that_is_or_lies_inside_a_file(tmp_path, where):
    config = small_folder(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    output, reason = {"inside a file": (tmp_path / "a-file" / "out", "a-file is a file, not a folder"),
                      "a file": (tmp_path / "a-file", "it is a file, not a folder")}[where]
    edit_config(config, lambda d: d["save"].update(output_path=str(output)))
    before = snapshot(tmp_path)
    assert_refused(cli("train", "--train-config", str(config)),
                   f"cannot write to the output folder {output} ({reason})", "-> set save.output_path")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- bad checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    config = small_folder(folder, count=2, training_loop={"num_epochs": 2, "batch_size": 1})
    return Trainer(load_config(config)).run().checkpoint_path.parent / "0000002_checkpoint.zip"


def rebuilt(checkpoint: Path, name: str, edit) -> Path:
    with zipfile.ZipFile(checkpoint) as archive:
        members = {member: archive.read(member) for member in archive.namelist()}
    edit(members)
    path = checkpoint.parent / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return path


def other_shapes(members: dict[str, bytes]) -> None:
    """An adapter for a model half as wide (its layers take 32 inputs, ours 64)."""
    adapter = load_safetensors(members["0000002_adapter.safetensors"])
    members["0000002_adapter.safetensors"] = save_safetensors(
        {key: value[:, :32] if key.endswith("lora_A") else value for key, value in adapter.items()})


def other_layers(members: dict[str, bytes]) -> None:
    """A config that names other layers than the adapter holds."""
    config = json.loads(members["0000002_config.json"])
    config["lora_layers"]["single_transformer_blocks"]["layer_types"] = ["attn.to_q", "proj_mlp"]
    members["0000002_config.json"] = json.dumps(config).encode()


BAD_CHECKPOINTS = {
    "path traversal": (lambda m: m.update({"../evil": b"x"}), ["unsafe member name '../evil'", "do not use it"]),
    "absolute member": (lambda m: m.update({"/tmp/evil": b"x"}), ["unsafe member name '/tmp/evil'"]),
    "missing member": (lambda m: m.pop("0000002_loss.json"), ["lacks its loss member", "use an earlier one"]),
    "missing adapter": (lambda m: m.pop("0000002_adapter.safetensors"), ["lacks its adapter member"]),
    "damaged member": (lambda m: m.update({"0000002_optimizer.safetensors": b"\x10\x00\x00\x00garbage"}),
                       ["has a damaged member", "use an earlier checkpoint"]),
    "another model": (other_shapes, ["holds a LoRA for other layers or another model", "start a new training"]),
    "other layers than its config": (other_layers, ["holds a LoRA for other layers or another model"]),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_a_bad_checkpoint_is_refused_with_one_message(checkpoint, case):
    edit, words = BAD_CHECKPOINTS[case]
    path = rebuilt(checkpoint, f"{case.replace(' ', '-')}.zip", edit)
    run_folder = checkpoint.parents[2]
    before = snapshot(run_folder)
    assert_refused(cli("train", "--train-checkpoint", str(path)), path.name, *words)
    assert snapshot(run_folder) == before
    assert not (run_folder.parent / "evil").exists() and not Path("/tmp/evil").exists()


def test_a_truncated_or_missing_checkpoint(checkpoint, tmp_path):
    cut = tmp_path / "0000002_checkpoint.zip"
    cut.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    assert_refused(cli("train", "--train-checkpoint", str(cut)), "not a readable zip", "use an earlier checkpoint")
    assert_refused(cli("train", "--train-checkpoint", str(tmp_path / "gone.zip")), "gone.zip does not exist")
