"""`dreambooth-wizard generate` on the tiny model: LoRA files of every format, several at once."""
from __future__ import annotations

import subprocess
import sys

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
