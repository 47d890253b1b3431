"""The training config: mflux's JSON schema as dataclasses, read, checked, written.

mflux validates almost nothing (a frequency of 0 divides by zero, a missing key
is a KeyError deep in training). Here every problem is found before anything
heavy starts, and all of them are reported at once as a `ConfigError`, each
naming the key path, the value and the fix. Doubts that should not stop a run
(a learning rate far from usual, a prompt without the trigger word, keys we do
not know) come back from `validate` as warnings.

The guide's configs load unchanged; `config_to_dict` writes mflux JSON back,
keeping the user's spellings, so mflux can train from what the wizard saved.
Each field carries a one-line help text (`help_text("optimizer.learning_rate")`)
that the wizard shows next to the value.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from pathlib import Path
from typing import Any

from engine.config_checks import (
    config_warnings,
    infer_trigger,
    lora_problems,
    missing_files,
    prompt_tokens,
)
from engine.config_reader import load_config, parse_config
from engine.config_schema import (
    FLUX1_JOINT_BLOCKS,
    FLUX1_SINGLE_BLOCKS,
    JOINT_LAYER_TYPES,
    MFLUX_JOINT_ALIASES,
    MODEL_ALIASES,
    OPTIMIZERS,
    QUANTIZE_BITS,
    SINGLE_LAYER_TYPES,
    TEMPLATE_DESCRIPTIONS,
    TEMPLATES_DIR,
    TINY_MODEL,
    BlockRange,
    ExampleImage,
    Examples,
    Instrumentation,
    LoraBlockSpec,
    LoraLayers,
    OptimizerSpec,
    SaveSpec,
    TrainingConfig,
    TrainingLoop,
    canonical_layer_type,
    canonical_optimizer,
    model_source,
)
from engine.errors import ConfigError
from engine.paths import atomic_write

# The config's API lives here; its schema, reader and checks each have their own module.
__all__ = [
    "FLUX1_JOINT_BLOCKS", "FLUX1_SINGLE_BLOCKS", "JOINT_LAYER_TYPES", "MFLUX_JOINT_ALIASES", "MODEL_ALIASES",
    "OPTIMIZERS", "QUANTIZE_BITS", "SINGLE_LAYER_TYPES", "TEMPLATES_DIR", "TEMPLATE_DESCRIPTIONS", "TINY_MODEL",
    "BlockRange", "ConfigError", "ExampleImage", "Examples", "Instrumentation", "LoraBlockSpec", "LoraLayers",
    "OptimizerSpec", "SaveSpec", "TrainingConfig", "TrainingLoop",
    "canonical_layer_type", "canonical_optimizer", "config_to_dict", "help_text", "infer_trigger", "list_templates",
    "load_config", "load_template", "lora_targets", "model_source", "parse_config", "prompt_tokens", "save_config",
    "trains_joint_blocks", "validate",
]  # fmt: skip


def validate(cfg: TrainingConfig, num_joint_blocks: int = FLUX1_JOINT_BLOCKS,
             num_single_blocks: int = FLUX1_SINGLE_BLOCKS, *, trigger: str | None = None,
             check_files: bool = False) -> list[str]:
    """Raises ConfigError listing every problem; returns warnings (runs that may disappoint).

    The block limits come from the model. `trigger` is the word every prompt
    should contain (inferred from the prompts when None). `check_files` also
    requires every image file to exist.
    """
    # the same checks as loading, types included: the wizard edits these fields by hand
    checked, problems = None, []
    try:
        checked = parse_config(config_to_dict(cfg), cfg.base_dir, num_joint_blocks=num_joint_blocks,
                               num_single_blocks=num_single_blocks)
    except ConfigError as error:
        problems = list(error.problems)
    if check_files:
        problems += missing_files(cfg)
    if problems:
        raise ConfigError(problems)
    return list(cfg.unknown_keys) + config_warnings(checked, trigger)


def lora_targets(cfg: TrainingConfig, num_joint_blocks: int = FLUX1_JOINT_BLOCKS,
                 num_single_blocks: int = FLUX1_SINGLE_BLOCKS) -> list[tuple[str, int]]:
    """Every layer to wrap, as (module path in diffusers names, rank), e.g. ("single_transformer_blocks.3.attn.to_q", 4)."""
    problems = lora_problems(cfg.lora_layers, num_joint_blocks, num_single_blocks)
    if problems:
        raise ConfigError([message for _, message in problems])
    targets: dict[str, int] = {}
    for kind in ("transformer_blocks", "single_transformer_blocks"):
        spec = getattr(cfg.lora_layers, kind)
        if spec is None:
            continue
        for block in sorted(set(spec.block_range.blocks())):
            for name in spec.layer_types:
                targets.setdefault(f"{kind}.{block}.{canonical_layer_type(name, kind == 'transformer_blocks')}", spec.lora_rank)
    return list(targets.items())


def trains_joint_blocks(lora_paths) -> bool:
    """Whether any LoRA target (a path as `lora_targets` gives it) lies in a joint (double-stream) block."""
    return any(path.removeprefix("transformer.").startswith("transformer_blocks.") for path in lora_paths)


def config_to_dict(cfg: TrainingConfig, *, absolute_paths: bool = False) -> dict:
    """mflux JSON for `cfg`; absolute_paths makes examples.path and save.output_path absolute (checkpoints)."""
    data: dict[str, Any] = {
        "model": cfg.model, "seed": cfg.seed, "steps": cfg.steps, "guidance": cfg.guidance,
        "quantize": cfg.quantize, "width": cfg.width, "height": cfg.height,
        "training_loop": dataclasses.asdict(cfg.training_loop),
        "optimizer": dataclasses.asdict(cfg.optimizer),
        "save": {"output_path": str(cfg.output_dir) if absolute_paths else cfg.save.output_path,
                 "checkpoint_frequency": cfg.save.checkpoint_frequency},
    }  # fmt: skip
    if cfg.instrumentation is not None:
        data["instrumentation"] = dataclasses.asdict(cfg.instrumentation)
    data["lora_layers"] = {}
    for kind in ("transformer_blocks", "single_transformer_blocks"):
        spec = getattr(cfg.lora_layers, kind)
        if spec is not None:
            block_range = spec.block_range
            data["lora_layers"][kind] = {
                "block_range": {"indices": list(block_range.indices)} if block_range.indices is not None
                else {"start": block_range.start, "end": block_range.end},
                "layer_types": list(spec.layer_types),
                "lora_rank": spec.lora_rank,
            }
    data["examples"] = {
        "path": str(cfg.examples_dir) if absolute_paths else cfg.examples.path,
        "images": [{"image": e.image, "prompt": e.prompt, **({"crop": list(e.crop)} if e.crop else {})}
                   for e in cfg.examples.images],
    }
    if cfg.gradient_checkpointing:  # ours; mflux ignores unknown top-level keys, so files stay compatible
        data["gradient_checkpointing"] = True
    return data


def save_config(cfg: TrainingConfig, path: str | Path) -> Path:
    """Writes `cfg` as mflux JSON (atomically); relative paths are rebased to the new folder."""
    path = Path(path).expanduser().resolve()
    data = config_to_dict(cfg)
    if path.parent != cfg.base_dir:
        for section, key, absolute in (("examples", "path", cfg.examples_dir), ("save", "output_path", cfg.output_dir)):
            if not Path(data[section][key]).expanduser().is_absolute():
                data[section][key] = os.path.relpath(absolute, path.parent)
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def help_text(key_path: str) -> str:
    """The one-line explanation of a key, e.g. help_text("lora_layers.single_transformer_blocks.lora_rank")."""
    owner: Any = TrainingConfig
    text = ""
    for part in re.sub(r"\[\d+\]", "", key_path).split("."):
        fields = {f.name: f for f in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else {}
        if part not in fields:
            raise KeyError(key_path)
        text = fields[part].metadata.get("help", "")
        owner = _dataclass_inside(typing.get_type_hints(owner)[part])
    return text


def _dataclass_inside(hint: Any) -> Any:
    """TrainingLoop for TrainingLoop, LoraBlockSpec | None, list[ExampleImage]; None for plain values."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


# ---------------------------------------------------------------- templates

def list_templates() -> list[str]:
    return sorted(path.stem for path in TEMPLATES_DIR.glob("*.json"))


def load_template(name: str, base_dir: str | Path | None = None) -> TrainingConfig:
    """A starting config ("pets", "people", "style", "object"); its images are placeholders to replace."""
    path = TEMPLATES_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError([f'unknown template "{name}"; choose one of: {", ".join(list_templates())}'])
    cfg = load_config(path)
    cfg.base_dir = Path(base_dir).expanduser().resolve() if base_dir is not None else TEMPLATES_DIR
    return cfg
