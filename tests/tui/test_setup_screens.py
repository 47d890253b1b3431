"""Each setup screen driven by keys, good input and bad: inline messages, never a crash."""
from __future__ import annotations

import json

import pytest
from textual.widgets import Static

from engine.config import load_config
from tests.tui.setup_helpers import (FIXED_MACHINE, SMALL_MACHINE, checked_state, draw_photo, make_photo_folder,
                                     type_into, wait_for_screen, wait_until)
from tui.app import WizardApp
from tui.state import WizardState

pytestmark = pytest.mark.anyio
SIZE = (100, 30)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def text_of(app, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


@pytest.fixture
def photos(tmp_path):
    return make_photo_folder(tmp_path / "photos")


# ---------------------------------------------------------------- welcome


async def test_welcome_shows_the_machine_and_n_starts_with_the_chosen_model():
    app = WizardApp(machine=FIXED_MACHINE)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "Apple M2 Max" in text_of(app, "#machine"), what="machine line")
        assert "64.0 GiB unified memory" in text_of(app, "#machine")
        await pilot.press("right", "right")  # dev -> schnell -> tiny: the arrows choose at once
        await pilot.press("n")
        await wait_for_screen(pilot, "ImagesScreen")
        assert app.state.model == "tiny"


async def test_welcome_other_model_needs_a_repo_id_or_folder(tmp_path):
    app = WizardApp(machine=FIXED_MACHINE)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("right", "right", "right")  # other
        await pilot.press("n")
        await pilot.pause()
        assert type(app.screen).__name__ == "WelcomeScreen"
        assert "repo id" in text_of(app, "#model-error")
        await type_into(pilot, "#model-other", "./no/such/folder")
        app.screen.query_one("#model-choice").focus()
        await pilot.press("n")
        await pilot.pause()
        assert "neither a folder" in text_of(app, "#model-error")
        await type_into(pilot, "#model-other", "someone/flux-finetune")
        app.screen.query_one("#model-choice").focus()
        await pilot.press("n")
        await wait_for_screen(pilot, "ImagesScreen")
        assert app.state.model == "someone/flux-finetune"


async def test_welcome_d_starts_the_demo_on_the_tiny_model(tmp_path):
    app = WizardApp(machine=FIXED_MACHINE, demo_folder=tmp_path / "demo")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("d")
        await wait_for_screen(pilot, "ImagesScreen")
        assert app.state.demo and app.state.model == "tiny"
        assert len(app.state.images) >= 5 and all(image.path.is_file() for image in app.state.images)


async def test_help_opens_for_the_current_screen_and_ctrl_c_asks_before_quitting():
    app = WizardApp(machine=FIXED_MACHINE)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        await wait_for_screen(pilot, "HelpModal")
        assert "trigger word" in app.screen.help_text
        await pilot.press("escape")
        await wait_for_screen(pilot, "WelcomeScreen")
        await pilot.press("ctrl+c")
        await wait_for_screen(pilot, "ConfirmDialog")
        await pilot.press("n")
        await wait_for_screen(pilot, "WelcomeScreen")
        await pilot.press("ctrl+c")
        await wait_for_screen(pilot, "ConfirmDialog")
        await pilot.press("y")
        await pilot.pause()
    assert app.return_value == 0


# ---------------------------------------------------------------- images


async def test_images_are_checked_and_the_bad_ones_rejected_with_a_reason(photos):
    app = WizardApp(machine=FIXED_MACHINE, start="images", browse_root=photos.parent)
    async with app.run_test(size=SIZE) as pilot:
        await type_into(pilot, "#path-input", str(photos), submit=True)
        await wait_until(pilot, lambda: not app.screen.checking and app.state.images, what="checks")
        by_name = {image.path.name: image for image in app.state.images}
        assert "notes.txt" not in by_name  # not a photo: never listed
        assert by_name["tiny.png"].status == "rejected" and "120x90" in by_name["tiny.png"].reasons[0]
        assert by_name["broken.jpg"].status == "rejected" and by_name["broken.jpg"].reasons
        assert by_name["dog6.jpg"].status == "ok" and by_name["dog6.jpg"].size == (768, 512)
        # the default crop is the largest centred square
        assert by_name["dog6.jpg"].crop == (128, 0, 512, 512)
        usable = {image.path.name for image in app.state.usable_images}
        assert usable == {"dog1.png", "dog2.png", "dog3.png", "dog4.png", "dog5.png", "dog6.jpg"}
        assert "6 photos" in text_of(app, "#advice") and "2 rejected" in text_of(app, "#advice")
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "LabelScreen")


async def test_images_empty_folder_and_folder_of_non_images_give_inline_messages(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("a")
    (texts / "b.csv").write_text("b")
    app = WizardApp(machine=FIXED_MACHINE, start="images", browse_root=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await type_into(pilot, "#path-input", str(empty), submit=True)
        assert "is empty" in text_of(app, "#path-error")
        await type_into(pilot, "#path-input", str(texts), submit=True)
        assert "No photos in" in text_of(app, "#path-error") and "2 item(s)" in text_of(app, "#path-error")
        await type_into(pilot, "#path-input", str(texts / "a.txt"), submit=True)
        assert "not a photo" in text_of(app, "#path-error")
        await type_into(pilot, "#path-input", str(tmp_path / "nowhere"), submit=True)
        assert "does not exist" in text_of(app, "#path-error")
        assert app.state.images == []
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert type(app.screen).__name__ == "ImagesScreen"
        assert "Add your photos first" in text_of(app, "#step-problems")


async def test_only_rejected_images_cannot_go_on(tmp_path):
    folder = tmp_path / "bad"
    draw_photo(folder / "small.png", (100, 100), seed=1)
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    app = WizardApp(machine=FIXED_MACHINE, start="images", browse_root=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await type_into(pilot, "#path-input", str(folder), submit=True)
        await wait_until(pilot, lambda: not app.screen.checking, what="checks")
        assert [image.status for image in app.state.images] == ["rejected", "rejected"]
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert "None of these photos can be used" in text_of(app, "#step-problems")


async def test_tree_key_a_adds_the_highlighted_folder_and_x_removes(photos):
    app = WizardApp(machine=FIXED_MACHINE, start="images", browse_root=photos)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.5)  # the tree lists its folder in a worker
        app.screen.query_one("#tree").focus()
        await pilot.press("a")  # the root (the photos folder) is highlighted
        await wait_until(pilot, lambda: app.state.images and not app.screen.checking, what="checks")
        assert len(app.state.images) == 8
        app.screen.query_one("#image-table").focus()
        await pilot.press("x")
        await wait_until(pilot, lambda: not app.screen.checking, what="re-check")
        assert len(app.state.images) == 7 and "broken.jpg" not in {i.path.name for i in app.state.images}


async def test_crop_editor_moves_and_resizes_keeping_the_aspect(photos):
    state = checked_state(photos)
    app = WizardApp(state=state, machine=FIXED_MACHINE, start="images", browse_root=photos)
    async with app.run_test(size=SIZE) as pilot:
        table = app.screen.query_one("#image-table")
        table.focus()
        await pilot.press(*["down"] * 5)  # dog6.jpg, 768x512, crop (128, 0, 512, 512)
        image = app.screen.highlighted_image()
        assert image.path.name == "dog6.jpg"
        await wait_until(pilot, lambda: image.path in app.screen.thumbnails, what="thumbnail")
        await pilot.press("c")
        await wait_for_screen(pilot, "CropEditor")
        await pilot.press("right")  # 5% of 768 = 38 pixels
        assert app.screen.box.as_tuple() == (166, 0, 512, 512)
        await pilot.press("minus")
        box = app.screen.box
        assert box.width == box.height < 512
        await pilot.press("enter")
        await wait_for_screen(pilot, "ImagesScreen")
        assert image.crop == box.as_tuple()
        await pilot.press("c")
        await wait_for_screen(pilot, "CropEditor")
        await pilot.press("left", "left", "escape")  # cancelled: the crop stays
        await wait_for_screen(pilot, "ImagesScreen")
        assert image.crop == box.as_tuple()


# ---------------------------------------------------------------- label


async def test_label_prompts_follow_trigger_and_noun_unless_edited(photos):
    state = checked_state(photos)
    for image in state.images:
        image.prompt = ""
    app = WizardApp(state=state, machine=FIXED_MACHINE, start="label")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert [image.prompt for image in state.usable_images] == ["photo of sks dog"] * 6
        await type_into(pilot, "#prompt-0", "photo of sks dog on a red sofa")
        await type_into(pilot, "#class-noun", "cat")
        assert state.class_noun == "cat"
        assert state.images[0].prompt == "photo of sks dog on a red sofa"  # edited: kept
        assert state.images[1].prompt == "photo of sks cat"
        await type_into(pilot, "#trigger-2", "zwx")  # a second subject with its own trigger
        assert state.images[2].trigger == "zwx" and state.images[2].prompt == "photo of zwx cat"
        await type_into(pilot, "#trigger", "qqz")
        assert state.trigger == "qqz"
        assert state.images[1].trigger == "qqz" and state.images[1].prompt == "photo of qqz cat"
        assert state.images[2].trigger == "zwx"  # its own trigger is kept
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "TemplateScreen")


async def test_label_warns_about_common_words_and_many_pieces(photos):
    app = WizardApp(state=checked_state(photos, model="tiny"), machine=FIXED_MACHINE, start="label")
    async with app.run_test(size=SIZE) as pilot:
        await type_into(pilot, "#trigger", "cat")
        assert "common English word" in text_of(app, "#trigger-advice")
        await type_into(pilot, "#trigger", "zxqvbnm")
        await wait_until(pilot, lambda: "pieces" in text_of(app, "#trigger-advice"), 60, "tokenizer advice")
        await type_into(pilot, "#trigger", "sks")
        await pilot.pause(0.5)
        assert text_of(app, "#trigger-advice").strip() == ""


async def test_label_empty_trigger_or_prompt_blocks_the_next_step(photos):
    app = WizardApp(state=checked_state(photos), machine=FIXED_MACHINE, start="label")
    async with app.run_test(size=SIZE) as pilot:
        await type_into(pilot, "#prompt-1", " ")
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert type(app.screen).__name__ == "LabelScreen"
        assert "dog2.png: the prompt is empty" in text_of(app, "#step-problems")
        await type_into(pilot, "#prompt-1", "photo of sks dog")
        await type_into(pilot, "#trigger", "two words")
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert "more than one word" in text_of(app, "#step-problems")


# ---------------------------------------------------------------- template


async def test_template_rejects_out_of_range_values_inline(photos):
    app = WizardApp(state=checked_state(photos), machine=FIXED_MACHINE, start="template")
    async with app.run_test(size=SIZE) as pilot:
        cases = {"#epochs": ("0", "from 1 to 10000"), "#learning-rate": ("fast", "type a number"),
                 "#resolution": ("500", "multiple of 16"), "#single-blocks": ("0-99", "at most 38"),
                 "#quantize": ("7", "3, 4, 5, 6, 8"), "#single-rank": ("2.5", "whole number")}
        for selector, (typed, message) in cases.items():
            await type_into(pilot, selector, typed)
            field = app.screen.query_one(selector)
            assert field.has_class("invalid")
            assert message in str(field.query_one(".field-error").render())
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert type(app.screen).__name__ == "TemplateScreen"
        assert "Epochs" in text_of(app, "#step-problems")


async def test_template_edits_and_switches_reach_the_config(photos):
    app = WizardApp(state=checked_state(photos), machine=FIXED_MACHINE, start="template")
    async with app.run_test(size=SIZE) as pilot:
        assert app.screen.query_one("#epochs").input.value == "100"  # pets
        app.screen.query_one("#template-choice").focus()
        await pilot.press("right")  # pets -> style
        await pilot.pause()
        assert app.state.template == "style"
        assert app.screen.query_one("#joint-blocks").input.value == "5-15"
        await type_into(pilot, "#epochs", "40")
        await type_into(pilot, "#learning-rate", "3e-4")
        await type_into(pilot, "#resolution", "768x512")
        await type_into(pilot, "#joint-blocks", "")
        app.screen.query_one("#gradient-checkpointing Checkbox").focus()
        await pilot.press("space")
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "MemoryScreen")
        config = app.state.config
        assert config["training_loop"]["num_epochs"] == 40 and config["optimizer"]["learning_rate"] == 3e-4
        assert (config["width"], config["height"]) == (768, 512)
        assert "transformer_blocks" not in config["lora_layers"] and config["gradient_checkpointing"] is True
        # crops follow the new training shape
        image = app.state.images[0]
        assert abs(image.crop[2] / image.crop[3] - 768 / 512) < 0.01


# ---------------------------------------------------------------- memory


async def test_memory_fixes_are_one_key_and_update_the_config(photos):
    state = checked_state(photos)
    state.template = "style"
    app = WizardApp(state=state, machine=SMALL_MACHINE, start="memory")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.screen.estimate is not None, 30, "estimate")
        first = app.screen.estimate.peak
        assert not app.screen.estimate.fits(SMALL_MACHINE.available_for_training)
        fixes = {fix.key: fix for fix in app.screen.fixes}
        assert "g" in fixes and "Does not fit" in text_of(app, "#memory-fixes")
        assert fixes["g"].label in text_of(app, "#memory-fixes")
        await pilot.press("g")
        await wait_until(pilot, lambda: app.screen.estimate.peak < first, 30, "new estimate")
        assert app.state.config["gradient_checkpointing"] is True
        assert app.screen.estimate.peak == fixes["g"].estimate.peak
        if "4" in {fix.key for fix in app.screen.fixes}:
            await pilot.press("4")
            await wait_until(pilot, lambda: app.state.config["quantize"] == 4, 30, "quantize fix")


async def test_memory_that_fits_offers_no_fixes(photos):
    app = WizardApp(state=checked_state(photos), machine=FIXED_MACHINE, start="memory")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.screen.estimate is not None, 30, "estimate")
        assert app.screen.fixes == [] and "Fits" in text_of(app, "#memory-fixes")
        await pilot.press("4")  # not offered: nothing changes
        await pilot.pause()
        assert app.state.config == {}
        await pilot.press("ctrl+n")
        await wait_for_screen(pilot, "ReviewScreen")


async def test_a_gpu_that_fits_only_a_held_back_run_says_so(photos):
    # 4-bit style without checkpointing holds dense copies of dequantized weights unless the trainer
    # caps it (engine/memory_limit.py): on a card between the two estimates it fits, held back
    import dataclasses

    from engine.machine import MachineInfo
    from engine.memory import estimate_memory

    state = checked_state(photos)
    state.template = "style"
    roomy = MachineInfo("cuda", "Roomy GPU", 200 * 2**30, 190 * 2**30)
    app = WizardApp(state=state, machine=roomy, start="memory")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.screen.estimate is not None, 30, "estimate")
        inputs = dataclasses.replace(app.screen.inputs, quantize=4)
    uncapped = estimate_memory(inputs)
    capped = estimate_memory(dataclasses.replace(inputs, available_bytes=uncapped.peak - 1))
    assert not uncapped.details["graph_memory_capped"] and capped.details["graph_memory_capped"]
    assert capped.peak < uncapped.peak
    between = (capped.peak + uncapped.peak) // 2
    state = checked_state(photos)
    state.template = "style"
    tight = MachineInfo("cuda", "Tight GPU", between * 2, between)
    app = WizardApp(state=state, machine=tight, start="memory")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.screen.estimate is not None, 30, "estimate")
        assert app.screen.inputs.quantize == 8  # the template's own: too much here; the 4-bit fix fits, held back
        assert next(fix for fix in app.screen.fixes if fix.key == "4").fits
        await pilot.press("4")
        await wait_until(pilot, lambda: app.screen.inputs.quantize == 4, 30, "quantize fix")
        assert app.screen.estimate.peak == capped.peak
        assert "Fits" in text_of(app, "#memory-fixes") and "held to this estimate" in text_of(app, "#memory-fixes")


# ---------------------------------------------------------------- review


async def test_review_saves_the_config_next_to_the_images(photos):
    app = WizardApp(state=checked_state(photos), machine=FIXED_MACHINE, start="review")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        expected = photos / "dreambooth-wizard.json"
        assert f"dreambooth-wizard train --train-config {expected}" in text_of(app, "#review-command")
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: app.state.config_path is not None, what="save")
    assert app.state.config_path == expected
    data = json.loads(expected.read_text())
    assert data["examples"]["path"] == "."
    # the centre crop is the default: only moved crops are written
    assert data["examples"]["images"][0] == {"image": "dog1.png", "prompt": "photo of sks dog"}
    cfg = load_config(expected)
    assert [path.name for path in cfg.image_paths] == [f"dog{i}.png" for i in range(1, 6)] + ["dog6.jpg"]
    assert cfg.output_dir == photos.parent / "photos-lora"


async def test_review_unwritable_output_folder_is_an_inline_message(photos, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    app = WizardApp(state=checked_state(photos), machine=FIXED_MACHINE, start="review")
    async with app.run_test(size=SIZE) as pilot:
        await type_into(pilot, "#output-dir", str(blocker / "out"))
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert type(app.screen).__name__ == "ReviewScreen"
        assert "cannot be written" in text_of(app, "#output-dir-error")
        assert app.state.config_path is None and not (photos / "dreambooth-wizard.json").exists()
        await type_into(pilot, "#config-path", str(blocker / "c.json"))
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert "cannot be written" in text_of(app, "#config-path-error")


async def test_screens_start_from_a_state_with_no_photos_without_crashing():
    for name in ("label", "template", "memory", "review"):
        app = WizardApp(state=WizardState(), machine=FIXED_MACHINE, start=name)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause(0.3)
            await pilot.press("ctrl+n")
            await pilot.pause(0.3)
            assert type(app.screen).__name__.lower().startswith(name)
