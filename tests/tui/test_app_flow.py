"""The setup flow end to end by keys: welcome -> images -> label -> template -> memory -> review.

The screens after Review (access, train) are replaced by a stand-in here, so
these tests stop where the setup hands over and never start a training.
"""
from __future__ import annotations

import json

import pytest
from textual.screen import Screen
from textual.widgets import Static

import tui.app
from engine.config import load_config
from tests.tui.setup_helpers import FIXED_MACHINE, make_photo_folder, type_into, wait_for_screen, wait_until
from tui.app import WizardApp

pytestmark = pytest.mark.anyio
SIZE = (100, 30)


@pytest.fixture
def anyio_backend():
    return "asyncio"


class HandedOver(Screen):
    """Stands in for the access and train screens."""

    def compose(self):
        yield Static("handed over")


@pytest.fixture(autouse=True)
def stand_in_after_review(monkeypatch):
    screens = dict(tui.app.SCREENS_BY_NAME, access=(__name__, "HandedOver"), train=(__name__, "HandedOver"))
    monkeypatch.setattr(tui.app, "SCREENS_BY_NAME", screens)


async def test_the_whole_setup_by_keys_saves_a_config_that_trains_what_was_chosen(tmp_path):
    photos = make_photo_folder(tmp_path / "photos")
    app = WizardApp(machine=FIXED_MACHINE, browse_root=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        # welcome: the tiny model, new training
        await pilot.press("right", "right", "n")
        await wait_for_screen(pilot, "ImagesScreen")

        # images: the folder, checked; dog6.jpg's crop moved right
        await type_into(pilot, "#path-input", str(photos), submit=True)
        await wait_until(pilot, lambda: app.state.images and not app.screen.checking, what="checks")
        app.screen.query_one("#image-table").focus()
        await pilot.press(*["down"] * 6)  # broken.jpg, dog1-5, dog6.jpg
        moved = app.screen.highlighted_image()
        assert moved.path.name == "dog6.jpg"
        await wait_until(pilot, lambda: moved.path in app.screen.thumbnails, what="thumbnail")
        await pilot.press("c")
        await wait_for_screen(pilot, "CropEditor")
        await pilot.press("right", "right", "enter")
        await wait_for_screen(pilot, "ImagesScreen")
        assert moved.crop == (204, 0, 512, 512)
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "LabelScreen")

        # label: a toy called "zqx"; one prompt describes its scene
        await type_into(pilot, "#trigger", "zqx")
        await type_into(pilot, "#class-noun", "toy")
        await type_into(pilot, "#prompt-0", "photo of zqx toy on a table")
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "TemplateScreen")

        # template: object, 3 epochs, rank 8 -> 6
        app.screen.query_one("#template-choice").focus()
        await pilot.press("left")  # object, people, pets, style: pets -> people
        await pilot.press("left")  # object
        await pilot.pause()
        assert app.state.template == "object"
        await type_into(pilot, "#epochs", "3")
        await type_into(pilot, "#single-rank", "6")
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "MemoryScreen")

        # memory: fits this machine
        await wait_until(pilot, lambda: app.screen.estimate is not None, 30, "estimate")
        assert "fits" in str(app.screen.query_one("#memory-bar").render())
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "ReviewScreen")

        # review: Enter saves and hands over
        await pilot.press("enter")
        await wait_for_screen(pilot, "HandedOver")

    state = app.state
    assert state.model == "tiny" and state.trigger == "zqx" and state.class_noun == "toy"
    assert [image.path.name for image in state.usable_images] == [f"dog{i}.png" for i in range(1, 6)] + ["dog6.jpg"]
    assert state.config_path == photos / "dreambooth-wizard.json"
    assert state.output_dir == tmp_path / "photos-lora"

    saved = json.loads(state.config_path.read_text())
    assert saved["model"] == "tiny" and saved["examples"]["path"] == "."
    prompts = {entry["image"]: entry["prompt"] for entry in saved["examples"]["images"]}
    assert prompts["dog1.png"] == "photo of zqx toy on a table" and prompts["dog2.png"] == "photo of zqx toy"
    crops = {entry["image"]: entry.get("crop") for entry in saved["examples"]["images"]}
    assert crops["dog6.jpg"] == [204, 0, 512, 512] and crops["dog1.png"] is None  # only the moved crop
    assert saved["training_loop"]["num_epochs"] == 3
    assert saved["lora_layers"]["single_transformer_blocks"]["lora_rank"] == 6
    cfg = load_config(state.config_path)
    assert cfg.model == "tiny" and len(cfg.examples.images) == 6 and cfg.output_dir == state.output_dir


async def test_going_back_keeps_every_choice_and_a_removed_photo_leaves_the_config(tmp_path):
    photos = make_photo_folder(tmp_path / "photos")
    app = WizardApp(machine=FIXED_MACHINE, browse_root=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n")
        await wait_for_screen(pilot, "ImagesScreen")
        await type_into(pilot, "#path-input", str(photos), submit=True)
        await wait_until(pilot, lambda: app.state.images and not app.screen.checking, what="checks")
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "LabelScreen")
        await type_into(pilot, "#prompt-1", "photo of sks dog in the snow")
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "TemplateScreen")
        await type_into(pilot, "#epochs", "77")
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "MemoryScreen")

        # back to the template: the edited value is still there
        await pilot.press("escape")
        await wait_for_screen(pilot, "TemplateScreen")
        assert app.screen.query_one("#epochs").input.value == "77"
        # back to the images: remove dog1.png
        await pilot.press("escape")
        await wait_for_screen(pilot, "LabelScreen")
        await pilot.press("escape")
        await wait_for_screen(pilot, "ImagesScreen")
        app.screen.query_one("#image-table").focus()
        await pilot.press("down", "x")  # broken.jpg, then dog1.png
        await wait_until(pilot, lambda: not app.screen.checking, what="re-check")
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "LabelScreen")
        assert app.screen.query_one("#prompt-0").value == "photo of sks dog in the snow"  # dog2, edited earlier
        for _ in range(3):
            await pilot.press("ctrl+n")
            await pilot.pause(0.3)
        await wait_for_screen(pilot, "ReviewScreen")
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "HandedOver")

    saved = json.loads((photos / "dreambooth-wizard.json").read_text())
    assert [entry["image"] for entry in saved["examples"]["images"]] == ["dog2.png", "dog3.png", "dog4.png",
                                                                         "dog5.png", "dog6.jpg"]
    assert saved["training_loop"]["num_epochs"] == 77


def test_resume_subcommand_opens_the_wizard_on_the_resume_screen_with_logs_in_a_file(tmp_path, monkeypatch):
    import argparse
    import logging

    from engine.paths import log_dir
    from tui.commands import resume

    opened = {}

    def fake_run(app):
        opened.update(start=app.start, output_dir=app.state.output_dir)
        return 0

    monkeypatch.setattr(WizardApp, "run", fake_run)
    parser = argparse.ArgumentParser()
    resume.add_parser(parser)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert resume.run(parser.parse_args([str(tmp_path / "my-run")])) == 0
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
    assert opened == {"start": "resume", "output_dir": tmp_path / "my-run"}
    assert "wizard opens at resume" in (log_dir() / "wizard.log").read_text()
