"""The whole wizard by keys on the tiny model: photos -> label -> template -> memory ->
review -> (access skipped) -> train a few steps -> checkpoint -> stop; then resume and finish."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.tui.run_helpers import first, recording_factory
from tests.tui.setup_helpers import FIXED_MACHINE, make_photo_folder, type_into, wait_for_screen, wait_until
from tui.app import WizardApp
from tui.state import WizardState

pytestmark = pytest.mark.anyio
SIZE = (100, 30)
REAL_TIMEOUT = 240.0


@pytest.fixture
def anyio_backend():
    return "asyncio"


def count(events, kind):
    return sum(e["type"] == kind for e in events)


async def test_setup_train_checkpoint_stop_then_resume_and_finish(tmp_path, monkeypatch):
    from tui.screens import train

    photos = make_photo_folder(tmp_path / "photos")
    events: list[dict] = []
    monkeypatch.setattr(train, "build_trainer", recording_factory(events))
    app = WizardApp(machine=FIXED_MACHINE, browse_root=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("right", "right", "n")  # the tiny model, new training
        await wait_for_screen(pilot, "ImagesScreen")
        await type_into(pilot, "#path-input", str(photos), submit=True)
        await wait_until(pilot, lambda: app.state.images and not app.screen.checking, what="checks")
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "LabelScreen")
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "TemplateScreen")
        await type_into(pilot, "#epochs", "4")
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "MemoryScreen")
        await wait_until(pilot, lambda: app.screen.estimate is not None, 30, "estimate")
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "ReviewScreen")
        await pilot.press("enter")
        await wait_for_screen(pilot, "TrainScreen", timeout=30)  # access is skipped for tiny

        await wait_until(pilot, lambda: count(events, "step") >= 1, REAL_TIMEOUT, "first step")
        await pilot.press("s")
        await wait_until(pilot, lambda: count(events, "checkpoint") >= 1, REAL_TIMEOUT, "checkpoint on request")
        await pilot.press("q")
        await wait_for_screen(pilot, "ConfirmDialog")
        await pilot.press("y")
        await wait_until(pilot, lambda: first(events, "finished"), REAL_TIMEOUT, "stop")
        stopped = first(events, "finished")
        assert stopped["stopped"] and Path(stopped["checkpoint_path"]).is_file()
        await wait_until(pilot, lambda: not app.screen.training_running, what="worker end")
        output_dir = app.state.output_dir
        total = first(events, "step")["total_steps"]
        assert stopped["step"] < total

    resumed: list[dict] = []
    monkeypatch.setattr(train, "build_trainer", recording_factory(resumed))
    app = WizardApp(state=WizardState(output_dir=output_dir), start="resume", machine=FIXED_MACHINE)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_screen(pilot, "ResumeScreen")
        await pilot.press("enter")  # the newest checkpoint: where the first run stopped
        await wait_for_screen(pilot, "TrainScreen")
        await wait_until(pilot, lambda: first(resumed, "finished"), REAL_TIMEOUT * 2, "resumed run to finish")
        finished = first(resumed, "finished")
        assert not finished["stopped"] and finished["step"] == total
        assert [e["step"] for e in resumed if e["type"] == "step"][0] == stopped["step"] + 1
        assert Path(finished["adapter_path"]).is_file()
