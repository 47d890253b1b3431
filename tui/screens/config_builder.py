"""From the wizard's state to an mflux training config, and back.

`state.config` keeps the template's values as edited (mflux JSON, absolute
paths); the photos, prompts, crops and model always come from the state itself,
so going back to an earlier step never leaves the config behind.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from engine.config import (FLUX1_JOINT_BLOCKS, FLUX1_SINGLE_BLOCKS, TrainingConfig, config_to_dict,
                           load_template, parse_config)
from tui.state import WizardState

CONFIG_FILE_NAME = "dreambooth-wizard.json"
# the tiny model learns nothing real: small, short runs keep the demo and tests quick
TINY_SIZE = 128
TINY_EPOCHS = 5
TINY_FREQUENCY = 10


def model_block_counts(model: str) -> tuple[int, int]:
    """(joint, single) transformer blocks of `model`, from its config (no download); FLUX.1's if unknown."""
    try:
        from engine.memory import model_configs_for

        transformer = model_configs_for(model, Path.cwd()).transformer
        return int(transformer.get("num_layers", FLUX1_JOINT_BLOCKS)), int(
            transformer.get("num_single_layers", FLUX1_SINGLE_BLOCKS))
    except Exception:
        return FLUX1_JOINT_BLOCKS, FLUX1_SINGLE_BLOCKS


def images_folder(state: WizardState) -> Path | None:
    """The folder that holds all usable photos (their common parent)."""
    paths = [image.path for image in state.usable_images]
    if not paths:
        return None
    return Path(os.path.commonpath([str(path.parent) for path in paths]))


def default_output_dir(state: WizardState) -> Path:
    folder = images_folder(state) or Path.cwd()
    return folder.parent / f"{folder.name}-lora"


def template_config(name: str, model: str) -> TrainingConfig:
    """A template adapted to the model: its blocks scaled to the model's, small and short for tiny."""
    cfg = load_template(name)
    cfg.model = model
    joint, single = model_block_counts(model)
    for kind, limit, flux_limit in (("transformer_blocks", joint, FLUX1_JOINT_BLOCKS),
                                    ("single_transformer_blocks", single, FLUX1_SINGLE_BLOCKS)):
        spec = getattr(cfg.lora_layers, kind)
        if spec is not None and limit != flux_limit:
            spec.block_range = scale_block_range(spec.block_range, limit, flux_limit)
    if model.strip().lower() == "tiny":
        cfg.width = cfg.height = TINY_SIZE
        cfg.quantize = None  # tiny's layers are narrower than a quantization group
        cfg.training_loop.num_epochs = TINY_EPOCHS
        cfg.save.checkpoint_frequency = TINY_FREQUENCY
        if cfg.instrumentation is not None:
            cfg.instrumentation.generate_image_frequency = TINY_FREQUENCY
    return cfg


def scale_block_range(block_range, limit: int, flux_limit: int):
    """The same share of the model's blocks ('the later half') for a model with `limit` blocks."""
    from engine.config import BlockRange

    if block_range.indices is not None:
        kept = sorted({min(limit - 1, index * limit // flux_limit) for index in block_range.indices})
        return BlockRange(indices=kept)
    start = min(limit - 1, (block_range.start or 0) * limit // flux_limit)
    end = max(start + 1, min(limit, math.ceil((block_range.end or 0) * limit / flux_limit)))
    return BlockRange(start, end)


def examples_section(state: WizardState, folder: Path, with_crops: bool = False) -> dict:
    """mflux's examples; a crop is written only where the user moved it (the centre crop is the default)."""
    from engine.crops import default_crop

    width, height = int(state.config.get("width") or 512), int(state.config.get("height") or 512)
    images = []
    for image in state.usable_images:
        entry = {"image": os.path.relpath(image.path, folder), "prompt": image.prompt}
        centred = default_crop(image.size, width, height).as_tuple() if image.size else None
        if with_crops and image.crop and tuple(image.crop) != centred:
            entry["crop"] = list(image.crop)  # left, top, width, height in the photo's pixels
        images.append(entry)
    return {"path": str(folder), "images": images}


def build_config(state: WizardState) -> TrainingConfig:
    """The run's config from the state; raises ConfigError listing what is wrong."""
    data = dict(state.config) if state.config else config_to_dict(template_config(state.template, state.model),
                                                                    absolute_paths=True)
    folder = images_folder(state) or Path.cwd()
    data["model"] = state.model
    data["examples"] = examples_section(state, folder)
    if state.output_dir is not None:
        data["save"] = dict(data.get("save", {}), output_path=str(state.output_dir))
    if data.get("instrumentation"):
        prompt = next((image.prompt for image in state.usable_images if image.prompt.strip()), "")
        data["instrumentation"] = dict(data["instrumentation"], validation_prompt=prompt or "photo of sks")
    joint, single = model_block_counts(state.model)
    return parse_config(data, folder, num_joint_blocks=joint, num_single_blocks=single)


def config_for_file(cfg: TrainingConfig, state: WizardState, config_path: Path) -> dict:
    """mflux JSON to save at `config_path`: examples.path relative to it, crops kept."""
    data = config_to_dict(cfg, absolute_paths=True)
    folder = images_folder(state) or config_path.parent
    data["examples"] = examples_section(state, folder, with_crops=True)
    data["examples"]["path"] = os.path.relpath(folder, config_path.parent)
    data["save"]["output_path"] = home_relative(cfg.output_dir)
    return data


def home_relative(path: Path) -> str:
    """'~/x' under the home folder (mflux expands ~ too, and the file reads the same on another machine)."""
    try:
        return "~/" + Path(path).relative_to(Path.home()).as_posix()
    except ValueError:
        return str(path)
