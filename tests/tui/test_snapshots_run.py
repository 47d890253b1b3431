"""Snapshots (100x30) of the Train, Done, Resume and Access screens with fixed content.

Runs are scripted events and fake output folders (fixed losses, dates and
pictures); images are drawn with half-blocks whatever the terminal; paths are
relative to a temporary working folder. Update with `--snapshot-update` and
look at the SVGs in tests/tui/__snapshots__/.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from textual_image.widget import HalfcellImage

from tests.tui.run_helpers import draw_previews, make_fake_run, scripted_events, scripted_factory
from tests.tui.setup_helpers import FIXED_MACHINE, wait_for_screen, wait_until
from tui.app import WizardApp
from tui.state import WizardState

SIZE = (100, 30)


@pytest.fixture(autouse=True)
def fixed_rendering(tmp_path, monkeypatch):
    import tui.widgets.preview as preview

    monkeypatch.setattr(preview, "Image", HalfcellImage)  # the same pictures in any terminal
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def fake_run():
    from tui.demo_images import draw_demo_images

    images = Path("photos").resolve()
    draw_demo_images(images, count=8)
    return make_fake_run(Path("run"), images)


def log_text(app) -> str:
    return "\n".join(line.text for line in app.screen.query_one("#train-log").lines)


def train_app(monkeypatch, events, error=None) -> WizardApp:
    from tui.screens import train

    monkeypatch.setattr(train, "build_trainer", scripted_factory(events, error=error))
    return WizardApp(state=WizardState(model="tiny"), start="train", machine=FIXED_MACHINE)


def test_train_screen_mid_run(snap_compare, monkeypatch):
    draw_previews(Path("run"), (8, 16))
    app = train_app(monkeypatch, scripted_events())

    async def run_before(pilot):
        await wait_until(pilot, lambda: "20 / 32" in str(app.screen.query_one("#train-numbers").render()),
                         what="step 20")
        await wait_until(pilot, lambda: app.screen.query_one("#train-preview").current is not None, what="preview")
        await wait_until(pilot, lambda: "warning" in log_text(app), what="the last event")  # all events shown
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_train_screen_stop_question(snap_compare, monkeypatch):
    app = train_app(monkeypatch, scripted_events(previews=()))

    async def run_before(pilot):
        await wait_until(pilot, lambda: "20 / 32" in str(app.screen.query_one("#train-numbers").render()),
                         what="step 20")
        await pilot.press("q")
        await wait_for_screen(pilot, "ConfirmDialog")

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_train_screen_engine_error(snap_compare, monkeypatch):
    from engine.errors import OutputError

    error = OutputError("cannot write to the output folder /Volumes/backup/dog-lora (Permission denied)",
                        "set save.output_path to a folder you can write to")
    events = [{"type": "phase", "phase": "load", "detail": "loading tiny"},
              {"type": "error", "message": error.message, "hint": error.hint}]
    app = train_app(monkeypatch, events, error=error)

    async def run_before(pilot):
        await wait_for_screen(pilot, "ErrorDialog")
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_done_screen(snap_compare, fake_run):
    app = WizardApp(state=WizardState(model="tiny", output_dir=fake_run), start="done", machine=FIXED_MACHINE)

    async def run_before(pilot):
        await wait_for_screen(pilot, "DoneScreen")
        await pilot.press("left")
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_resume_screen(snap_compare, fake_run):
    app = WizardApp(state=WizardState(output_dir=fake_run), start="resume", machine=FIXED_MACHINE)

    async def run_before(pilot):
        await wait_for_screen(pilot, "ResumeScreen")
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_access_screen_gated(snap_compare, tmp_path, monkeypatch):
    from engine.flux.tiny import ensure_tiny_model
    from tests.tui.hub_stub import HubStub, StubRepo, point_huggingface_hub_at

    stub = HubStub({"black-forest-labs/FLUX.1-dev": StubRepo(ensure_tiny_model(), gated=True)})
    with stub:
        point_huggingface_hub_at(monkeypatch, stub.endpoint, tmp_path / "hf")
        app = WizardApp(state=WizardState(model="dev"), start="access", machine=FIXED_MACHINE)

        async def run_before(pilot):
            await wait_until(pilot, lambda: app.screen.query_one("#access-login").display, 30, "token field")
            app.screen.query_one("#access-token").cursor_blink = False
            await pilot.pause(0.3)

        assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
