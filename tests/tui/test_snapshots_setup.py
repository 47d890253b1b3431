"""Snapshots (100x30) of the setup screens with fixed content: a fixed machine, photos drawn from seeds,
the home folder pointed at the test's folder so paths read `~/photos/...` on every machine.

Update after an intended change with `pytest tests/tui/test_snapshots_setup.py --snapshot-update`
and look at the SVGs under tests/tui/__snapshots__/.
"""
from __future__ import annotations

import pytest

from tests.tui.setup_helpers import (FIXED_MACHINE, SMALL_MACHINE, checked_state, make_photo_folder, type_into,
                                     wait_for_screen, wait_until)
from tui.app import WizardApp

SIZE = (100, 30)
# the wizard's own thread workers (DirectoryTree keeps a loader of its own running)
OUR_WORKERS = {"check", "thumbnail", "estimate", "machine", "tokenizer"}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_photo_folder(tmp_path / "photos")
    return tmp_path


def wizard(home, start="welcome", machine=FIXED_MACHINE, checked=True, template="pets") -> WizardApp:
    state = checked_state(home / "photos") if checked else None
    if state is not None:
        state.template = template
    return WizardApp(state=state, machine=machine, start=start, browse_root=home)


async def settle(pilot):
    """Workers done, cursors steady: the picture no longer changes."""
    from textual.widgets import Input

    for screen in pilot.app.screen_stack:
        for field in screen.query(Input):
            field.cursor_blink = False
    await pilot.pause(0.3)
    await wait_until(pilot, lambda: not any(w.is_running and w.group in OUR_WORKERS for w in pilot.app.workers),
                     what="workers")
    await pilot.pause(0.2)


def test_welcome(snap_compare, home):
    async def run_before(pilot):
        await wait_until(pilot, lambda: "Apple" in str(pilot.app.screen.query_one("#machine").render()))
        await settle(pilot)

    assert snap_compare(wizard(home, checked=False), terminal_size=SIZE, run_before=run_before)


def test_welcome_help(snap_compare, home):
    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("question_mark")
        await wait_for_screen(pilot, "HelpModal")
        await settle(pilot)

    assert snap_compare(wizard(home, checked=False), terminal_size=SIZE, run_before=run_before)


def test_quit_question(snap_compare, home):
    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("ctrl+c")
        await wait_for_screen(pilot, "ConfirmDialog")
        await settle(pilot)

    assert snap_compare(wizard(home, checked=False), terminal_size=SIZE, run_before=run_before)


def test_images_checked_with_a_thumbnail(snap_compare, home):
    async def run_before(pilot):
        app = pilot.app
        await type_into(pilot, "#path-input", str(home / "photos"), submit=True)
        await wait_until(pilot, lambda: app.state.images and not app.screen.checking, what="checks")
        app.screen.query_one("#image-table").focus()
        await pilot.press("down")  # dog1.png
        # drawn, not only loaded: under load the picture can arrive a frame after the dict entry
        await wait_until(pilot, lambda: app.state.images[1].path in app.screen.thumbnails
                         and app.screen.query_one("#thumbnail").query_one(".thumbnail-image").display,
                         what="thumbnail")
        await settle(pilot)

    assert snap_compare(wizard(home, start="images", checked=False), terminal_size=SIZE, run_before=run_before)


def test_images_empty_folder_message(snap_compare, home):
    (home / "empty").mkdir()

    async def run_before(pilot):
        await type_into(pilot, "#path-input", "~/empty", submit=True)
        await settle(pilot)

    assert snap_compare(wizard(home, start="images", checked=False), terminal_size=SIZE, run_before=run_before)


def test_crop_editor(snap_compare, home):
    async def run_before(pilot):
        app = pilot.app
        app.screen.query_one("#image-table").focus()
        await pilot.press(*["down"] * 5)  # dog6.jpg, 768x512
        await wait_until(pilot, lambda: app.screen.highlighted_image().path in app.screen.thumbnails)
        await pilot.press("c")
        await wait_for_screen(pilot, "CropEditor")
        await pilot.press("right", "minus")
        await settle(pilot)

    assert snap_compare(wizard(home, start="images"), terminal_size=SIZE, run_before=run_before)


def test_label(snap_compare, home):
    assert snap_compare(wizard(home, start="label"), terminal_size=SIZE, run_before=settle)


def test_label_common_word_warning(snap_compare, home):
    async def run_before(pilot):
        await type_into(pilot, "#trigger", "cat")
        await settle(pilot)

    assert snap_compare(wizard(home, start="label"), terminal_size=SIZE, run_before=run_before)


def test_template(snap_compare, home):
    assert snap_compare(wizard(home, start="template"), terminal_size=SIZE, run_before=settle)


def test_template_invalid_values(snap_compare, home):
    async def run_before(pilot):
        await type_into(pilot, "#epochs", "0")
        await type_into(pilot, "#learning-rate", "fast")
        await pilot.press("ctrl+n")
        await settle(pilot)

    assert snap_compare(wizard(home, start="template"), terminal_size=SIZE, run_before=run_before)


def test_memory_fits(snap_compare, home):
    async def run_before(pilot):
        await wait_until(pilot, lambda: pilot.app.screen.estimate is not None, 30, "estimate")
        await settle(pilot)

    assert snap_compare(wizard(home, start="memory"), terminal_size=SIZE, run_before=run_before)


def test_memory_does_not_fit_with_fixes(snap_compare, home):
    async def run_before(pilot):
        await wait_until(pilot, lambda: pilot.app.screen.estimate is not None, 30, "estimate")
        await settle(pilot)

    assert snap_compare(wizard(home, start="memory", machine=SMALL_MACHINE, template="style"), terminal_size=SIZE,
                        run_before=run_before)


def test_review(snap_compare, home):
    assert snap_compare(wizard(home, start="review"), terminal_size=SIZE, run_before=settle)


def test_review_unwritable_output_folder(snap_compare, home):
    (home / "a-file").write_text("not a folder")

    async def run_before(pilot):
        await type_into(pilot, "#output-dir", "~/a-file/out")
        await pilot.press("ctrl+n")
        await settle(pilot)

    assert snap_compare(wizard(home, start="review"), terminal_size=SIZE, run_before=run_before)
