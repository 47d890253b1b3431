"""`dreambooth-wizard estimate` and `demo`: what they say when the user's flags or folders cannot work."""
from __future__ import annotations

import json
import os

import pytest

from tui.cli import main


def assert_one_message(stderr: str, *words: str) -> None:
    assert stderr.startswith("error:") and "Traceback" not in stderr
    assert "\n  -> " in stderr and len(stderr.strip().splitlines()) <= 4
    assert all(word in stderr for word in words), stderr


@pytest.fixture
def demo_config_path(tmp_path):
    from tui.commands.demo import prepare_demo

    return prepare_demo(tmp_path / "demo")


@pytest.mark.parametrize("memory", ["nan", "inf", "1e400", "-5", "0"])
def test_estimate_rejects_memory_that_is_not_a_positive_number(demo_config_path, capsys, memory):
    code = main(["estimate", "--train-config", str(demo_config_path), "--memory", memory])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert_one_message(captured.err, "--memory", "positive number of GiB")


def test_estimate_compares_with_a_given_memory(demo_config_path, capsys):
    assert main(["estimate", "--train-config", str(demo_config_path), "--memory", "24", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["available"] == 24 * 2**30


def test_demo_into_a_file_is_one_message(tmp_path, capsys):
    target = tmp_path / "base.json"
    target.write_text("{}")
    assert main(["demo", "--headless", "--folder", str(target)]) == 2
    assert_one_message(capsys.readouterr().err, "base.json", "is a file", "--folder")
    assert target.read_text() == "{}"


def test_demo_under_a_file_is_one_message(tmp_path, capsys):
    (tmp_path / "base.json").write_text("{}")
    assert main(["demo", "--headless", "--folder", str(tmp_path / "base.json" / "demo")]) == 2
    assert_one_message(capsys.readouterr().err, "cannot write the demo", "--folder")


def test_demo_in_a_folder_it_may_not_write_is_one_message(tmp_path, capsys, monkeypatch):
    import tui.demo_images

    def refuse(folder, *args, **kwargs):  # what a read-only parent gives, also when the tests run as root
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(tui.demo_images, "draw_demo_images", refuse)
    assert main(["demo", "--headless", "--folder", str(tmp_path / "ro" / "demo")]) == 2
    assert_one_message(capsys.readouterr().err, "Permission denied", "--folder")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_demo_in_a_read_only_folder_is_one_message(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        code = main(["demo", "--headless", "--folder", str(parent / "demo")])
    finally:
        parent.chmod(0o700)
    assert code == 2
    assert_one_message(capsys.readouterr().err, "Permission denied")


def test_demo_json_without_headless_is_an_error_not_the_wizard(tmp_path, capsys, monkeypatch):
    import tui.commands.wizard

    monkeypatch.setattr(tui.commands.wizard, "run_wizard", lambda **kwargs: pytest.fail("the wizard opened"))
    assert main(["demo", "--json", "--folder", str(tmp_path / "demo")]) == 2
    assert_one_message(capsys.readouterr().err, "--json", "--headless")
    assert not (tmp_path / "demo").exists()


def test_running_the_demo_again_keeps_an_edited_config_and_says_so(tmp_path):
    from tui.commands.demo import prepare_demo

    config_path = prepare_demo(tmp_path)
    edited = json.loads(config_path.read_text())
    edited["optimizer"]["learning_rate"] = 5e-4
    config_path.write_text(json.dumps(edited))
    notices = []
    assert prepare_demo(tmp_path, notices.append) == config_path
    assert json.loads(config_path.read_text()) == edited
    assert len(notices) == 1 and "kept your edited" in notices[0] and str(config_path) in notices[0]


def test_running_the_demo_again_rewrites_an_unedited_config_quietly(tmp_path):
    from tui.commands.demo import prepare_demo

    config_path = prepare_demo(tmp_path)
    original = config_path.read_text()
    config_path.write_text(json.dumps(json.loads(original)))  # same content, other layout: not an edit
    notices = []
    prepare_demo(tmp_path, notices.append)
    assert notices == [] and config_path.read_text() == original


def test_a_kept_config_that_is_broken_is_reported_with_the_notice(tmp_path, capsys):
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "demo_config.json").write_text('{"model": "tiny",')
    assert main(["demo", "--headless", "--folder", str(folder)]) == 2
    stderr = capsys.readouterr().err
    assert "note: kept your edited" in stderr and "not valid JSON" in stderr and "Traceback" not in stderr
    assert (folder / "demo_config.json").read_text() == '{"model": "tiny",'


def test_the_wizard_demo_reports_a_broken_kept_config_before_opening(tmp_path):
    from engine.errors import ConfigError
    from tui.commands.demo import demo_state

    (tmp_path / "demo_config.json").write_text("[]")
    with pytest.raises(ConfigError):
        demo_state(tmp_path)
