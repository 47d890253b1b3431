"""`dreambooth-wizard demo`: the whole flow on drawn sample photos and the tiny model.

With no flag it opens the wizard with everything filled in (the user still
walks through each step); `--headless` trains the same config with a progress
line per step and exits 0, which is what CI runs. The tiny model learns nothing
useful: the demo shows the flow, checkpoints, previews and resume in about a
minute on a laptop CPU. Running it again into the same folder keeps a
demo_config.json the user has edited.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_FOLDER = "dreambooth-demo"
CONFIG_NAME = "demo_config.json"
DEMO_SIZE = 64
DEMO_EPOCHS = 4  # 8 images x 4 epochs = 32 steps
DEMO_EVERY = 8  # checkpoint, preview and plot every 8 steps: 4 of each


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--headless", action="store_true", help="train without the wizard, a progress line per step")
    parser.add_argument("--folder", type=Path, default=Path(DEFAULT_FOLDER),
                        help=f"where the demo photos, config and training output go (default ./{DEFAULT_FOLDER})")
    parser.add_argument("--json", action="store_true", help="with --headless: print events as JSON lines")


def run(args: argparse.Namespace) -> int:
    from engine.errors import UserError

    if args.json and not args.headless:
        raise UserError("--json only works with --headless: the wizard shows its own progress",
                        "run `dreambooth-wizard demo --headless --json`, or leave out --json to open the wizard")
    folder = args.folder.expanduser().resolve()
    if args.headless:
        return run_demo_headless(folder, json_mode=args.json, on_notice=print_notice)
    from tui.commands.wizard import run_wizard

    # built before the wizard opens, so a folder that cannot be written is one message, not a broken screen
    return run_wizard(start="images", state=demo_state(folder, on_notice=print_notice))


def print_notice(text: str) -> None:
    # stderr: with --json, stdout carries only events
    print(f"note: {text}", file=sys.stderr, flush=True)


def prepare_demo(folder: Path, on_notice=None) -> Path:
    """Draw the photos and write the demo config into `folder`; returns the config path.

    A demo_config.json that differs from the demo's own (the user edited it) is kept
    as it is, and `on_notice(text)` says so: running the demo again never undoes edits.
    """
    from engine.errors import OutputError
    from engine.paths import atomic_write
    from tui.demo_images import draw_demo_images

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"the demo folder {folder} is a file", "give --folder a new or existing folder")
    config_path = folder / CONFIG_NAME
    try:
        images = draw_demo_images(folder / "images")
        config = demo_config(images, folder)
        if _differs(config_path, config):
            notice = f"kept your edited {config_path}; delete it to get the demo's own config back"
            log.info(notice)
            if on_notice:
                on_notice(notice)
        else:
            with atomic_write(config_path) as temporary:
                temporary.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise OutputError(f"cannot write the demo into {folder} ({error.strerror or error})",
                          "give --folder a folder you can write to") from error
    return config_path


def _differs(config_path: Path, config: dict) -> bool:
    """Whether `config_path` holds something other than `config` (a file that is not JSON counts)."""
    try:
        return json.loads(config_path.read_text(encoding="utf-8")) != config
    except FileNotFoundError:
        return False
    except ValueError:  # not JSON or not UTF-8: still the user's, and the config check will say what is wrong
        return True


def demo_config(images: list[Path], folder: Path) -> dict:
    """An mflux training config for the demo photos, all in one folder (paths relative to `folder`)."""
    from tui.demo_images import DEMO_CLASS_NOUN, DEMO_TRIGGER

    subject = f"{DEMO_TRIGGER} {DEMO_CLASS_NOUN}"
    return {
        "model": "tiny", "seed": 42, "steps": 8, "guidance": 3.5, "quantize": None,
        "width": DEMO_SIZE, "height": DEMO_SIZE,
        "training_loop": {"num_epochs": DEMO_EPOCHS, "batch_size": 1},
        "optimizer": {"name": "AdamW", "learning_rate": 1e-3},
        "save": {"output_path": "output", "checkpoint_frequency": DEMO_EVERY},
        "instrumentation": {"plot_frequency": DEMO_EVERY, "generate_image_frequency": DEMO_EVERY,
                            "validation_prompt": f"photo of {subject} on a beach"},
        "lora_layers": {
            "transformer_blocks": {"block_range": {"start": 0, "end": 2},
                                   "layer_types": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"],
                                   "lora_rank": 4},
            "single_transformer_blocks": {"block_range": {"start": 0, "end": 4},
                                          "layer_types": ["proj_out", "proj_mlp", "attn.to_q", "attn.to_k",
                                                          "attn.to_v"],
                                          "lora_rank": 4},
        },
        "examples": {"path": os.path.relpath(Path(images[0]).parent, folder),
                     "images": [{"image": Path(image).name, "prompt": f"photo of {subject}"} for image in images]},
    }


def demo_state(folder: Path, on_notice=None):
    """A WizardState with the demo's photos, labels and config filled in (demo=True, model tiny)."""
    from tui.demo_images import DEMO_CLASS_NOUN, DEMO_TRIGGER
    from tui.state import ImageChoice, WizardState

    from engine.config import load_config
    from engine.flux.tiny import ensure_tiny_model

    folder = Path(folder)
    config_path = prepare_demo(folder, on_notice)
    load_config(config_path)  # a kept, edited config must be one the wizard can read: else one message says why
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # built here, on the calling (main) thread, about a second once: the screens' workers then only read
    # it (MLX work in short-lived threads can abort the process at exit, see tui/mlx_thread.py)
    ensure_tiny_model()
    images_dir = folder / config["examples"]["path"]
    return WizardState(
        model="tiny", trigger=DEMO_TRIGGER, class_noun=DEMO_CLASS_NOUN, template="object", demo=True,
        images=[ImageChoice(path=images_dir / entry["image"], prompt=entry["prompt"], trigger=DEMO_TRIGGER)
                for entry in config["examples"]["images"]],
        config=config, config_path=config_path, output_dir=folder / config["save"]["output_path"])


def run_demo_headless(folder: Path, json_mode: bool = False, on_notice=None) -> int:
    import engine  # noqa: F401  (preloads the system BLAS before mlx)
    from engine.config import load_config
    from engine.events import TrainingControls
    from engine.trainer import Trainer
    from tui.commands.train import JsonLines, ProgressDisplay, run_training_headless

    config_path = prepare_demo(folder, on_notice)
    controls = TrainingControls()
    listener = JsonLines() if json_mode else ProgressDisplay()
    trainer = Trainer(load_config(config_path), listener, controls)
    return run_training_headless(trainer, controls, listener)
