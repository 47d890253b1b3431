"""`dreambooth-wizard generate` on the tiny model: LoRA files of every format, several at once."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from engine.flux.loading import load_model
from engine.lora import apply_lora, lora_parameters
from engine.lora_formats import save_diffusers, save_kohya, save_mflux
from tui.cli import main

TARGETS = [("single_transformer_blocks.0.proj_out", 4), ("transformer_blocks.1.attn.to_out.0", 4)]


def random_lora(seed: int) -> dict:
    transformer = load_model("tiny", text_encoders=False).transformer
    apply_lora(transformer, TARGETS, key=mx.random.key(seed))
    return {k: (mx.random.normal(v.shape, key=mx.random.key(seed + i)) * 0.5 if k.endswith("lora_B") else v)
            for i, (k, v) in enumerate(lora_parameters(transformer).items())}


def generate(tmp_path, name, *extra) -> tuple[int, np.ndarray | None]:
    out = tmp_path / f"{name}.png"
    code = main(["generate", "--model", "tiny", "--prompt", "photo of sks dog", "--width", "64", "--height", "64",
                 "--steps", "2", "--seed", "3", "-o", str(out), *extra])
    return code, (np.asarray(Image.open(out)) if out.is_file() else None)


def test_lora_files_in_every_format_change_the_image_the_same_way(tmp_path):
    flat = random_lora(1)
    files = {"mflux": tmp_path / "m.safetensors", "diffusers": tmp_path / "d.safetensors", "kohya": tmp_path / "k.safetensors"}
    save_mflux(str(files["mflux"]), flat)
    save_diffusers(str(files["diffusers"]), flat)
    save_kohya(str(files["kohya"]), flat)
    code, base = generate(tmp_path, "base")
    assert code == 0
    images = {}
    for fmt, path in files.items():
        code, images[fmt] = generate(tmp_path, fmt, "--lora-paths", str(path))
        assert code == 0
    assert np.abs(images["mflux"].astype(int) - base).max() > 0  # the LoRA does something
    assert np.abs(images["mflux"].astype(int) - images["diffusers"]).max() <= 1
    assert np.abs(images["mflux"].astype(int) - images["kohya"]).max() <= 1


def test_two_files_with_scales(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_mflux(str(first), random_lora(1))
    save_diffusers(str(second), random_lora(7))
    code, both = generate(tmp_path, "both", "--lora-paths", str(first), str(second), "--lora-scales", "0.5", "1.0")
    assert code == 0
    code, zero = generate(tmp_path, "zero", "--lora-paths", str(first), str(second), "--lora-scales", "0", "0")
    code, base = generate(tmp_path, "base")
    assert np.abs(zero.astype(int) - base).max() <= 1 and np.abs(both.astype(int) - base).max() > 0


@pytest.mark.parametrize("case", ["other_architecture", "scale_count"])
def test_bad_lora_input_is_one_clear_message(tmp_path, case):
    lora = tmp_path / "sd.safetensors"
    from safetensors.numpy import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 320), np.float32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.zeros((320, 4), np.float32)}, str(lora))
    extra = ["--lora-scales", "1", "2"] if case == "scale_count" else []
    run = subprocess.run([sys.executable, "-m", "tui.cli", "generate", "--model", "tiny", "--prompt", "x", "--width", "64",
                          "--height", "64", "--steps", "1", "-o", str(tmp_path / "x.png"), "--lora-paths", str(lora), *extra],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error:") and len(run.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "x.png").exists()


def generate_exit(tmp_path, capsys, *extra, output=None) -> tuple[int, str]:
    """Run `generate` on the tiny model with `extra` flags; returns the exit code and stderr."""
    code = main(["generate", "--model", "tiny", "--prompt", "x", "--width", "64", "--height", "64", "--steps", "2",
                 "-o", str(output or tmp_path / "x.png"), *extra])
    return code, capsys.readouterr().err


def assert_one_message(stderr: str, *words: str) -> None:
    assert stderr.startswith("error:") and "Traceback" not in stderr
    assert "\n  -> " in stderr and len(stderr.strip().splitlines()) <= 6
    assert all(word in stderr for word in words), stderr


@pytest.mark.parametrize("flags, words", [
    (["--width", "65"], ["width = 65", "multiple of 16", "64 or 80"]),
    (["--width", "0"], ["width = 0", "16 to"]),
    (["--height", "-64"], ["height = -64", "16 to"]),
    (["--steps", "-3"], ["steps = -3", "1 to"]),
    (["--steps", "0"], ["steps = 0", "1 to"]),
    (["--seed", "-1"], ["seed = -1", "0 to 18446744073709551615"]),
    (["--seed", "99999999999999999999999"], ["seed = 99999999999999999999999"]),
    (["--guidance", "nan"], ["guidance = nan", "finite"]),
    (["--guidance", "-1"], ["guidance = -1", "0 or more"]),
    (["--lora-paths", "a.safetensors", "--lora-scales", "inf"], ["LoRA scale 1 = inf"]),
    (["--width", "65", "--seed", "-1", "--guidance", "inf"],
     ["3 problems", "width = 65", "seed = -1", "guidance = inf"]),
])
def test_bad_numbers_are_one_message_before_anything_is_drawn(tmp_path, capsys, flags, words):
    code, stderr = generate_exit(tmp_path, capsys, *flags)
    assert code == 2
    assert_one_message(stderr, *words)
    assert list(tmp_path.iterdir()) == []


def test_the_largest_seed_draws(tmp_path, capsys):
    code, _ = generate_exit(tmp_path, capsys, "--seed", str(2**64 - 1), "--steps", "1")
    assert code == 0 and (tmp_path / "x.png").is_file()


@pytest.mark.parametrize("case", ["existing folder", "trailing slash", "parent is a file", "empty"])
def test_an_output_that_is_not_a_file_path_is_one_message(tmp_path, capsys, case):
    (tmp_path / "gen").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    output = {"existing folder": str(tmp_path / "gen"), "trailing slash": str(tmp_path / "new") + "/",
              "parent is a file": str(tmp_path / "notes.txt" / "x.png"), "empty": " "}[case]
    code, stderr = generate_exit(tmp_path, capsys, output=output)
    assert code == 2
    assert_one_message(stderr, "-> ")
    if case in ("existing folder", "trailing slash"):
        assert "is a folder" in stderr and "image.png" in stderr
    if case == "empty":
        assert "-o is empty" in stderr and "-o image.png" in stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["gen", "notes.txt"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_one_message(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code, stderr = generate_exit(tmp_path, capsys, output=folder / "x.png")
    finally:
        folder.chmod(0o700)
    assert code == 2
    assert_one_message(stderr, "Permission denied", "folder you can write to")
    assert list(folder.iterdir()) == []


def test_a_failed_write_after_sampling_is_one_message_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    output = tmp_path / "out" / "x.png"
    real_replace = os.replace

    def refuse(source, target):  # as a folder made read-only while the image was drawn (works as root too)
        if Path(target) == output:
            raise PermissionError(13, "Permission denied", str(target))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", refuse)
    code, stderr = generate_exit(tmp_path, capsys, "--steps", "1", output=output)
    assert code == 2
    assert_one_message(stderr, "Permission denied")
    assert list(output.parent.iterdir()) == []


def test_save_png_into_a_folder_raises_output_error_and_leaves_no_temporary_file(tmp_path):
    from engine.errors import OutputError
    from engine.generate import save_png

    (tmp_path / "gen").mkdir()
    with pytest.raises(OutputError, match="image.png"):
        save_png(np.zeros((16, 16, 3), np.uint8), tmp_path / "gen")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["gen"]


def test_images_get_the_usual_file_permissions(tmp_path):
    from engine.generate import save_png

    umask = os.umask(0o022)
    os.umask(umask)
    path = save_png(np.zeros((16, 16, 3), np.uint8), tmp_path / "x.png")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
