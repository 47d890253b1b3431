"""Train, Done and Resume screens: scripted runs for the screen logic, real tiny runs for the keys."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from textual.widgets import Label, RichLog, Static

from tests.tui.run_helpers import (first, make_fake_run, recording_factory, scripted_events, scripted_factory,
                                   write_tiny_config)
from tests.tui.setup_helpers import FIXED_MACHINE, wait_for_screen, wait_until
from tui.app import WizardApp
from tui.state import WizardState

pytestmark = pytest.mark.anyio
SIZE = (100, 30)
REAL_TIMEOUT = 240.0  # real steps on a busy 2-core CI machine


@pytest.fixture
def anyio_backend():
    return "asyncio"


def text_of(app, selector: str) -> str:
    widget = app.screen.query_one(selector)
    return str(widget.render()) if isinstance(widget, (Static, Label)) else ""


def log_text(app) -> str:
    return "\n".join(line.text for line in app.screen.query_one("#train-log", RichLog).lines)


def kinds(events: list[dict]) -> str:
    return " ".join(f"{e['type']}{e.get('step', '')}" for e in events)


def train_app(state: WizardState, factory, monkeypatch, start: str = "train") -> WizardApp:
    from tui.screens import train

    monkeypatch.setattr(train, "build_trainer", factory)
    return WizardApp(state=state, start=start, machine=FIXED_MACHINE)


# ---------------------------------------------------------------- train screen, scripted


async def test_train_screen_says_while_steps_run_before_the_gpu_kernels_are_compiled(tmp_path, monkeypatch):
    # engine/trainer.py: on a machine's first CUDA run, the first steps run uncompiled
    monkeypatch.chdir(tmp_path)
    events = scripted_events(until=3, previews=())
    for event in events:
        if event["type"] == "step":
            event["uncompiled"] = True
    app = train_app(WizardState(model="tiny"), scripted_factory(events), monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "3 / 32" in text_of(app, "#train-numbers"), what="step 3")
        assert "4.00 it/s (GPU kernels compiling)" in text_of(app, "#train-numbers")
        app.screen.stop_training()
        await wait_until(pilot, lambda: not app.screen.training_running, what="end of the run")


async def test_train_screen_shows_steps_checkpoints_and_browsable_previews(tmp_path, monkeypatch):
    from tests.tui.run_helpers import draw_previews

    monkeypatch.chdir(tmp_path)
    draw_previews(Path("run"), (8, 16))
    app = train_app(WizardState(model="tiny"), scripted_factory(scripted_events()), monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "20 / 32" in text_of(app, "#train-numbers"), what="step 20")
        numbers = text_of(app, "#train-numbers")
        assert "epoch     3 / 4" in numbers and "4.00 it/s" in numbers and "0.25 GiB" in numbers
        assert "compiling" not in numbers  # compiled steps
        assert "ETA       3s" in numbers
        await wait_until(pilot, lambda: "warning" in log_text(app), what="warning in log")
        log = log_text(app)
        assert "checkpoint at step 16: _checkpoints/0000016_checkpoint.zip" in log
        assert "output folder: run" in log
        assert app.state.output_dir == Path("run")
        viewer = app.screen.query_one("#train-preview")
        assert [p.step for p in viewer.previews] == [8, 16] and viewer.current.step == 16
        await pilot.press("left_square_bracket")
        assert viewer.current.step == 8 and "step 8 · 1 of 2" in text_of(app, "#preview-caption")
        await pilot.press("left_square_bracket")  # already the oldest
        assert viewer.current.step == 8
        await pilot.press("right_square_bracket")
        assert viewer.current.step == 16
        assert app.screen.training_running
        app.screen.stop_training()
        await wait_until(pilot, lambda: not app.screen.training_running, what="end of the run")


async def test_step_messages_collapse_but_the_plot_keeps_every_point():
    from tui.messages import EventRelay, TrainingStep

    posted = []

    class Target:
        def post_message(self, message):
            posted.append(message)

    relay = EventRelay(Target())
    for step in range(1, 4):
        relay({"type": "step", "step": step, "loss": 1.0 / step})
    older, newest = posted[1], posted[2]
    assert newest.can_replace(older)  # a slow screen skips to the newest step...
    assert [s for s, _ in newest.losses] == [1, 2, 3]  # ...whose history still holds every point
    assert not TrainingStep({"step": 1}, ()).can_replace(object())


async def test_q_asks_before_stopping_and_no_keeps_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = train_app(WizardState(model="tiny"), scripted_factory(scripted_events(previews=())), monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "20 / 32" in text_of(app, "#train-numbers"), what="steps")
        await pilot.press("q")
        await wait_for_screen(pilot, "ConfirmDialog")
        await pilot.press("n")
        await wait_for_screen(pilot, "TrainScreen")
        assert app.screen.training_running and not app.screen.controls.stop_requested
        await pilot.press("q")
        await wait_for_screen(pilot, "ConfirmDialog")
        await pilot.press("y")
        await wait_until(pilot, lambda: app.screen.finished_event is not None, what="finished")
        assert app.screen.controls.stop_requested
        assert "Stopped at step 20" in text_of(app, "#train-status")
        await pilot.press("enter")
        await wait_for_screen(pilot, "DoneScreen")


async def test_engine_user_error_opens_a_dialog_that_says_what_to_do(tmp_path, monkeypatch):
    from engine.errors import OutputError

    monkeypatch.chdir(tmp_path)
    error = OutputError("cannot write to the output folder /readonly (Permission denied)",
                        "set save.output_path to a folder you can write to")
    events = [{"type": "phase", "phase": "load", "detail": "loading tiny"},
              {"type": "error", "message": error.message, "hint": error.hint}]
    app = train_app(WizardState(model="tiny"), scripted_factory(events, error=error), monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_screen(pilot, "ErrorDialog")
        await wait_until(pilot, lambda: not app.screen_stack[-2].training_running, what="worker end")
        dialog = app.screen
        assert "Permission denied" in str(dialog.query_one("#error-message").render())
        assert "save.output_path" in str(dialog.query_one("#error-hint").render())
        await pilot.pause(0.2)
        assert len([s for s in app.screen_stack if type(s).__name__ == "ErrorDialog"]) == 1  # shown once
        await pilot.press("enter")
        await wait_for_screen(pilot, "TrainScreen")
        assert "error" in text_of(app, "#train-status")


async def test_unexpected_exception_opens_a_dialog_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = train_app(WizardState(model="tiny"), scripted_factory([], error=RuntimeError("boom")), monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_screen(pilot, "ErrorDialog")
        assert "RuntimeError: boom" in str(app.screen.query_one("#error-message").render())


async def test_a_bad_config_is_reported_not_crashed(tmp_path, monkeypatch):
    from tui.screens import train

    config = tmp_path / "broken.json"
    config.write_text('{"model": "tiny", "steps": 0}')
    app = train_app(WizardState(model="tiny", config_path=config), train.build_trainer, monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_screen(pilot, "ErrorDialog")
        assert "problem" in str(app.screen.query_one("#error-message").render())


# ---------------------------------------------------------------- train screen, real tiny trainer


async def test_real_training_pause_checkpoint_preview_and_stop_with_checkpoint(tmp_path, monkeypatch):
    # requests are made while paused, so the test does not race the (fast or slow) steps; the run is
    # long (400 steps) so that it is still going when the second pause is asked for while it runs
    config = write_tiny_config(tmp_path, num_images=4, epochs=100)
    events: list[dict] = []
    app = train_app(WizardState(model="tiny", config_path=config), recording_factory(events), monkeypatch)

    def count(kind):
        return sum(e["type"] == kind for e in events)

    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        await wait_until(pilot, lambda: count("step"), REAL_TIMEOUT, "first step")
        await pilot.press("p")
        await wait_until(pilot, lambda: count("paused") == 1, REAL_TIMEOUT, f"paused in {kinds(events)}")
        steps_when_paused = count("step")
        await pilot.pause(1.0)
        assert count("step") == steps_when_paused
        assert "Paused" in text_of(app, "#train-status")

        await pilot.press("s", "v")
        await pilot.press("p")
        await wait_until(pilot, lambda: count("checkpoint") and count("preview"), REAL_TIMEOUT,
                         f"checkpoint and preview in {kinds(events)}")
        checkpoint, preview = first(events, "checkpoint"), first(events, "preview")
        assert checkpoint["step"] == preview["step"] == steps_when_paused + 1
        assert Path(checkpoint["path"]).is_file() and Path(preview["path"]).is_file()
        await wait_until(pilot, lambda: screen.query_one("#train-preview").current is not None, what="preview shown")
        assert "checkpoint at step" in log_text(app)

        await pilot.press("p")
        await wait_until(pilot, lambda: count("paused") == 2, REAL_TIMEOUT, f"second pause in {kinds(events)}")
        await pilot.press("q")
        await wait_for_screen(pilot, "ConfirmDialog")
        await pilot.press("y")
        await wait_until(pilot, lambda: first(events, "finished"), REAL_TIMEOUT, f"stop in {kinds(events)}")
        finished = first(events, "finished")
        assert finished["stopped"] and finished["step"] < 400
        assert Path(finished["checkpoint_path"]).name == f"{finished['step']:07d}_checkpoint.zip"
        assert Path(finished["checkpoint_path"]).is_file()
        await wait_until(pilot, lambda: not screen.training_running, what="worker end")
        assert app.state.output_dir == Path(finished["checkpoint_path"]).parent.parent
        assert "Stopped at step" in text_of(app, "#train-status")


# ---------------------------------------------------------------- done screen


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real 2-step tiny training with a checkpoint and a preview at each step."""
    from engine.config import load_config
    from engine.trainer import Trainer

    folder = tmp_path_factory.mktemp("trained")
    config = write_tiny_config(folder, num_images=2, epochs=1, checkpoint_frequency=1, preview_frequency=1)
    result = Trainer(load_config(config)).run()
    return result.output_dir


async def test_done_screen_shows_previews_per_checkpoint_and_exports_the_chosen_one(trained_run, tmp_path):
    from safetensors import safe_open

    output = tmp_path / "run"
    shutil.copytree(trained_run, output)
    app = WizardApp(state=WizardState(model="tiny", output_dir=output), start="done", machine=FIXED_MACHINE)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_screen(pilot, "DoneScreen")
        screen = app.screen
        thumbnails = list(screen.query("PreviewThumbnail"))
        assert [t.step for t in thumbnails] == [1, 2]
        assert all(t.image_path is not None for t in thumbnails)
        await wait_until(pilot, lambda: "step 2" in text_of(app, "#done-selected"), what="last chosen")
        # the last checkpoint is the final adapter: the command uses it as is
        assert str(output / "adapter.safetensors") in text_of(app, "#done-command")
        await pilot.press("left")
        assert "step 1" in text_of(app, "#done-selected") and thumbnails[0].has_class("-selected")
        assert "press m" in text_of(app, "#done-adapter")

        for key, fmt, probe in (("d", "diffusers", "lora_A.weight"), ("k", "kohya", "lora_down.weight"),
                                ("m", "mflux", "lora_A")):
            await pilot.press(key)
            target = output / "exports" / f"0000001_{fmt}.safetensors"
            await wait_until(pilot, lambda: "Exported" in text_of(app, "#done-exports") and fmt in
                             text_of(app, "#done-exports"), 60, f"{fmt} export")
            with safe_open(str(target), "np") as exported:
                assert any(name.endswith(probe) for name in exported.keys())
        assert "generate --model tiny" in text_of(app, "#done-command")
        assert str(output / "exports" / "0000001_mflux.safetensors") in text_of(app, "#done-command")
        assert "photo of sks toy on a beach" in text_of(app, "#done-command")


async def test_done_screen_without_output_says_so(tmp_path):
    app = WizardApp(state=WizardState(model="tiny", output_dir=tmp_path / "nothing"), start="done",
                    machine=FIXED_MACHINE)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_screen(pilot, "DoneScreen")
        assert "No training output folder" in text_of(app, "#done-title")
        await pilot.press("m")  # nothing to export: nothing happens, nothing crashes
        assert text_of(app, "#done-exports") == ""


# ---------------------------------------------------------------- resume screen


async def test_resume_lists_checkpoints_newest_first_with_their_details(tmp_path):
    from tui.demo_images import draw_demo_images

    images = tmp_path / "photos"
    draw_demo_images(images, count=3)
    output = make_fake_run(tmp_path / "run", images, steps=(8, 16))
    app = WizardApp(state=WizardState(output_dir=output), start="resume", machine=FIXED_MACHINE)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_screen(pilot, "ResumeScreen")
        table = app.screen.query_one("#resume-table")
        assert table.row_count == 2
        first_row = [str(cell) for cell in table.get_row_at(0)]
        assert first_row[0] == "16" and first_row[3] == "tiny" and first_row[5] == "present"
        assert "4 epochs" in first_row[4] and "rank 4" in first_row[4] and "64x64" in first_row[4]
        assert "0000016_checkpoint.zip" in text_of(app, "#resume-detail")
        shutil.rmtree(images)
        await pilot.press("up")
        app.screen.list_folder(output)  # listed again: the photos are gone now
        await pilot.pause()
        assert str(table.get_row_at(0)[5]) == "missing"
        assert "no longer in" in text_of(app, "#resume-detail")
        await pilot.press("enter")  # refused: resuming needs the photos
        await pilot.pause()
        assert type(app.screen).__name__ == "ResumeScreen" and app.state.resume_checkpoint is None


async def test_resume_asks_for_a_folder_and_explains_an_empty_one(tmp_path):
    app = WizardApp(state=WizardState(), start="resume", machine=FIXED_MACHINE)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_screen(pilot, "ResumeScreen")
        assert app.screen.focused.id == "resume-folder"
        app.screen.query_one("#resume-folder").value = str(tmp_path)
        await pilot.press("enter")
        await pilot.pause()
        assert "No checkpoints" in text_of(app, "#resume-detail")
        app.screen.query_one("#resume-folder").value = str(tmp_path / "absent")
        await pilot.press("enter")
        await pilot.pause()
        assert "not a folder" in text_of(app, "#resume-detail")


async def test_resume_continues_the_chosen_checkpoint_on_the_train_screen(trained_run, monkeypatch):
    events: list[dict] = []
    app = train_app(WizardState(output_dir=trained_run), recording_factory(events), monkeypatch, start="resume")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_screen(pilot, "ResumeScreen")
        await pilot.press("down")  # newest first: step 2, then step 1
        await pilot.press("enter")
        await wait_for_screen(pilot, "TrainScreen")
        assert app.state.resume_checkpoint.name == "0000001_checkpoint.zip"
        await wait_until(pilot, lambda: first(events, "finished"), REAL_TIMEOUT, "resumed run to finish")
        steps = [e["step"] for e in events if e["type"] == "step"]
        assert steps == [2]  # continued after step 1, not from scratch
        assert not first(events, "finished")["stopped"]
        # the curve and the previews of the first part of the run are there too
        await wait_until(pilot, lambda: len(app.screen.relay.losses) == 2, what="both losses")
        assert [step for step, _ in app.screen.relay.losses] == [1, 2]
        assert "resuming from 0000001_checkpoint.zip" in log_text(app)
        assert 1 in [p.step for p in app.screen.query_one("#train-preview").previews]


@pytest.mark.parametrize("start, key, expected", [("train", "question_mark", "Judge by the previews"),
                                                  ("done", "question_mark", "overfitted"),
                                                  ("resume", "f1", "output folder")])  # ? would go into its input
async def test_question_mark_opens_the_screen_help(start, key, expected, tmp_path, monkeypatch):
    from textual.widgets import Markdown

    monkeypatch.chdir(tmp_path)
    state = WizardState(model="tiny", output_dir=tmp_path)
    app = train_app(state, scripted_factory([], wait=False), monkeypatch, start=start)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: type(app.screen).__name__.lower().startswith(start), what=start)
        await pilot.press(key)
        await wait_for_screen(pilot, "HelpModal")
        assert expected in app.screen.query_one(Markdown).source
        await pilot.press("escape")
        await wait_until(pilot, lambda: type(app.screen).__name__.lower().startswith(start), what="back")
