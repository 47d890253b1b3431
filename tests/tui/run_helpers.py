"""Training runs for the Train, Done and Resume screen tests: real tiny ones and scripted ones.

Real runs use the tiny model at 64x64 with a 2-step noise grid, so a step and a
preview take moments. Scripted runs play fixed events (snapshots must not
depend on timing or floating point); fake output folders hold checkpoints
written by the engine's own writer with fixed contents and dates.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path

from PIL import Image

FIXED_DATE = datetime(2025, 3, 14, 9, 26)


def write_tiny_config(folder: Path, num_images: int = 4, epochs: int = 3, checkpoint_frequency: int = 1000,
                      preview_frequency: int = 1000, output: str = "output") -> Path:
    """Demo photos and a tiny-model config in `folder`; returns the config path."""
    from tui.commands.demo import demo_config
    from tui.demo_images import draw_demo_images

    images = draw_demo_images(folder / "images", count=num_images)
    config = demo_config(images, folder)
    config["steps"] = 2
    config["training_loop"]["num_epochs"] = epochs
    config["save"] = {"output_path": output, "checkpoint_frequency": checkpoint_frequency}
    config["instrumentation"].update(plot_frequency=1000, generate_image_frequency=preview_frequency)
    path = folder / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def recording_factory(events: list[dict]):
    """A TrainScreen trainer factory that builds the real Trainer and keeps every event it sends."""
    from tui.screens.train import build_trainer

    def factory(state, relay, controls):
        def callback(event):
            events.append(event)
            relay(event)

        return build_trainer(state, callback, controls)

    return factory


def first(events: list[dict], kind: str, **fields) -> dict | None:
    for event in events:
        if event["type"] == kind and all(event.get(k) == v for k, v in fields.items()):
            return event
    return None


# ---------------------------------------------------------------- scripted runs

def draw_previews(output: Path, steps) -> None:
    """Deterministic stand-ins for validation images (demo photos, shrunk)."""
    from tui.demo_images import draw_demo_images

    sources = draw_demo_images(output / "_sources", count=len(steps))
    folder = output / "_validation" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for step, source in zip(steps, sources):
        Image.open(source).convert("RGB").resize((64, 64)).save(folder / f"{step:07d}_validation_image.png")


def scripted_events(output: str = "run", total: int = 32, until: int = 20, previews=(8, 16)) -> list[dict]:
    """A run seen from the screen: loading, encoding, `until` steps of `total`, checkpoints and previews."""
    events = [{"type": "phase", "phase": "load", "detail": "loading tiny"},
              {"type": "phase", "phase": "encode", "detail": "encoding images and prompts"}]
    events += [{"type": "progress", "phase": "images", "done": done, "total": 8} for done in range(1, 9)]
    events.append({"type": "phase", "phase": "train", "detail": f"{total} steps"})
    for step in range(1, until + 1):
        loss = round(0.5 / step ** 0.5 + 0.04 * (step % 3), 4)
        events.append({"type": "step", "step": step, "total_steps": total, "epoch": 1 + (step - 1) // 8,
                       "num_epochs": total // 8, "loss": loss, "it_per_s": 4.0, "eta_s": (total - step) / 4.0,
                       "peak_memory_gib": 0.25})
        if step in previews:
            events.append({"type": "checkpoint", "step": step,
                           "path": f"{output}/_checkpoints/{step:07d}_checkpoint.zip"})
            events.append({"type": "preview", "step": step,
                           "path": f"{output}/_validation/images/{step:07d}_validation_image.png"})
    events.append({"type": "warning", "message": "the trigger word sks appears in only 7 of 8 prompts"})
    return events


class ScriptedTrainer:
    """Plays `events`, then waits like a running training until stopped (or ends with `error`)."""

    def __init__(self, events: list[dict], relay, controls, error: Exception | None = None,
                 wait: bool = True):
        self.events, self.relay, self.controls, self.error, self.wait = events, relay, controls, error, wait

    def run(self):
        for event in self.events:
            self.relay(event)
        if self.error is not None:
            raise self.error
        while self.wait and not self.controls.stop_requested:  # the screen stops it when it goes away
            time.sleep(0.02)
        step = max((e["step"] for e in self.events if e["type"] == "step"), default=0)
        self.relay({"type": "finished", "step": step, "stopped": self.wait, "adapter_path": None,
                    "checkpoint_path": f"run/_checkpoints/{step:07d}_checkpoint.zip"})
        return None


def scripted_factory(events: list[dict], error: Exception | None = None, wait: bool = True):
    return lambda state, relay, controls: ScriptedTrainer(events, relay, controls, error, wait)


# ---------------------------------------------------------------- fake output folders

def make_fake_run(output: Path, images_dir: Path, steps=(8, 16, 24, 32), model: str = "tiny") -> Path:
    """An output folder with checkpoints (engine writer, fixed contents and dates) and previews."""
    import mlx.core as mx

    from engine.checkpoint import CheckpointContents, write_checkpoint
    from engine.export import adapter_to_bytes
    from tui.commands.demo import demo_config

    images = sorted(images_dir.glob("*.png"))
    config = demo_config(images, images_dir.parent)
    config["model"] = model
    config["examples"]["path"] = str(images_dir.resolve())
    config["save"]["output_path"] = str(output.resolve())
    adapter = adapter_to_bytes({"transformer.single_transformer_blocks.0.attn.to_q.lora_A": mx.zeros((4, 32)),
                                "transformer.single_transformer_blocks.0.attn.to_q.lora_B": mx.zeros((32, 4))},
                               {"base_model": model})
    for step in steps:
        loss = [{"step": s, "loss": round(0.4 / s ** 0.5, 4), "time": 0.0} for s in range(1, step + 1)]
        iterator = {"position": 0, "epoch": step // 8, "num_iterations": step, "num_examples": len(images),
                    "batch_size": 1, "num_epochs": 4, "start_date_time": FIXED_DATE.isoformat()}
        path = write_checkpoint(output, CheckpointContents(step=step, adapter=adapter, optimizer={},
                                                           iterator=iterator, loss=loss, config=config),
                                FIXED_DATE)
        stamp = FIXED_DATE.timestamp() + step * 60
        os.utime(path, (stamp, stamp))
    draw_previews(output, steps)
    return output
