"""The demo: its drawn photos, its config, and `dreambooth-wizard demo --headless` end to end."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_photos_are_deterministic_varied_and_sized_for_training(tmp_path):
    from tui.demo_images import draw_demo_images

    first = draw_demo_images(tmp_path / "a")
    second = draw_demo_images(tmp_path / "b")
    assert len(first) == 8
    assert [digest(p) for p in first] == [digest(p) for p in second]
    assert len({digest(p) for p in first}) == 8
    for path in first:
        with Image.open(path) as image:
            assert 256 <= min(image.size) and max(image.size) <= 512
            assert image.mode == "RGB"


def test_demo_photos_show_the_same_subject_on_different_backgrounds(tmp_path):
    from tui.demo_images import TOY_BODY, draw_demo_images

    corners, body_shares = set(), []
    for path in draw_demo_images(tmp_path):
        with Image.open(path) as image:
            pixels = list(image.convert("RGB").getdata())
            corners.add(image.getpixel((0, 0)))
        body_shares.append(sum(pixel == TOY_BODY for pixel in pixels) / len(pixels))
    assert len(corners) >= 6  # backgrounds differ
    assert min(body_shares) > 0.03  # the red toy is in every picture, large enough to learn


def test_demo_config_is_a_valid_short_tiny_run(tmp_path):
    from engine.config import load_config
    from tui.commands.demo import prepare_demo

    config_path = prepare_demo(tmp_path)
    cfg = load_config(config_path)
    assert cfg.model == "tiny" and (cfg.width, cfg.height) == (64, 64)
    steps = len(cfg.examples.images) * cfg.training_loop.num_epochs // cfg.training_loop.batch_size
    assert 16 <= steps <= 64  # a few dozen steps
    assert steps // cfg.save.checkpoint_frequency >= 2 and cfg.instrumentation.generate_image_frequency <= steps
    assert all(path.is_file() for path in cfg.image_paths)
    assert all(example.prompt.startswith("photo of sks toy") for example in cfg.examples.images)


def test_demo_state_fills_every_step_of_the_wizard(tmp_path):
    from tui.commands.demo import demo_state

    state = demo_state(tmp_path)
    assert state.demo and state.model == "tiny" and state.trigger == "sks" and state.class_noun == "toy"
    assert len(state.usable_images) == 8 and all(image.path.is_file() for image in state.images)
    assert state.config_path.is_file() and json.loads(state.config_path.read_text())["model"] == "tiny"
    assert state.output_dir == tmp_path / "output"


def test_headless_demo_trains_and_exits_zero(tmp_path):
    env = dict(os.environ, DREAMBOOTH_WIZARD_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO),
               HF_HUB_OFFLINE="1", COLUMNS="100")
    folder = tmp_path / "demo"
    finished = subprocess.run([sys.executable, "-m", "tui.cli", "demo", "--headless", "--folder", str(folder)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    output = folder / "output"
    assert sorted(p.name for p in (output / "_checkpoints").glob("*.zip")) == [
        f"{step:07d}_checkpoint.zip" for step in (8, 16, 24, 32)]
    assert len(list((output / "_validation" / "images").glob("*.png"))) == 4
    assert (output / "adapter.safetensors").is_file()
    assert "32/32" in finished.stdout and "adapter.safetensors" in finished.stdout
