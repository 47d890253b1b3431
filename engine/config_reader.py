"""Reading a config's JSON: every problem is collected, each naming its key path, the value
and the fix, and raised at once as a `ConfigError`."""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from engine.config_checks import value_problems
from engine.config_schema import (
    FLUX1_JOINT_BLOCKS,
    FLUX1_SINGLE_BLOCKS,
    TEMPLATES_DIR,
    BlockRange,
    ExampleImage,
    Examples,
    Instrumentation,
    LoraBlockSpec,
    LoraLayers,
    TrainingConfig,
    canonical_optimizer,
    show_value,
)
from engine.errors import ConfigError

# the name it had before the config module was split, which users' log filters may name
logger = logging.getLogger("engine.config")

_KIND_EXAMPLES = {"int": "42", "number": "0.0001", "str": '"text"', "bool": "true", "list": "[...]", "object": "{...}"}


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class _Reader:
    """Walks the raw JSON and collects every problem instead of stopping at the first."""

    def __init__(self):
        self.problems: list[tuple[str, str]] = []  # (key path, message)
        self.unknown: list[str] = []
        self.misspelled: set[str] = set()  # key paths already reported through their misspelling

    def problem(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def obj(self, raw: Any, path: str, known: set[str], ignored: frozenset[str] = frozenset()) -> dict | None:
        if not isinstance(raw, dict):
            where = path or "the config"
            self.problem(path, f"{where} = {show_value(raw)}: must be an object {{...}} of keys and values")
            return None
        for key in raw:
            if key not in known and key not in ignored:
                near = difflib.get_close_matches(key, sorted(known), n=1)
                where = _join(path, key)
                # mflux configs may carry keys we ignore, so unknown keys only warn; but under lora_layers a
                # misspelling changes what trains ("transformer_block" silently skips the joint blocks)
                if near and (path == "lora_layers" or path.startswith("lora_layers.")):
                    self.misspelled.add(_join(path, near[0]))
                    self.problem(where, f'{where}: unknown key; did you mean "{near[0]}"? rename it: as written it '
                                        "is ignored, which changes what is trained")
                    continue
                hint = f' (did you mean "{near[0]}"?)' if near else ""
                self.unknown.append(f'unknown key "{where}" ignored{hint}')
        return raw

    def read(self, raw: dict, key: str, path: str, kind: str, target: Any, attr: str | None = None,
             required: bool = True) -> bool:
        """Copies raw[key] onto target.attr if it has the right type; True if it did."""
        attr = attr or key
        where = _join(path, key)
        if key not in raw:
            if required and where not in self.misspelled:
                example = show_value(_plain(getattr(target, attr)))
                self.problem(where, f'{where}: missing; add "{key}": {example}')
            return False
        value, error = _coerce(raw[key], kind)
        if error:
            self.problem(where, f"{where} = {show_value(raw[key])}: {error}, e.g. \"{key}\": {_example(target, attr, kind)}")
            return False
        setattr(target, attr, value)
        return True


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _example(target: Any, attr: str, kind: str) -> str:
    default = getattr(target, attr, None)
    return show_value(_plain(default)) if default is not None else _KIND_EXAMPLES[kind]


def _coerce(value: Any, kind: str) -> tuple[Any, str | None]:
    """(converted value, None) or (None, what is wrong)."""
    if kind in ("int", "number"):
        if isinstance(value, bool):
            return None, "must be a number, not true/false"
        if isinstance(value, str):
            try:
                float(value)
                return None, "must be a number, not text; remove the quotes"
            except ValueError:
                return None, "must be a number" if kind == "number" else "must be a whole number"
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return None, "must be a number" if kind == "number" else "must be a whole number"
        if kind == "int":
            if value != int(value):
                return None, "must be a whole number"
            return int(value), None
        return float(value), None
    if kind == "str":
        return (value, None) if isinstance(value, str) else (None, "must be text in quotes")
    if kind == "bool":
        return (value, None) if isinstance(value, bool) else (None, "must be true or false")
    if kind == "list":
        return (value, None) if isinstance(value, list) else (None, "must be a list [...]")
    raise ValueError(kind)


_TOP_KEYS = {
    "model", "seed", "steps", "guidance", "quantize", "width", "height", "training_loop", "optimizer",
    "save", "instrumentation", "lora_layers", "examples", "gradient_checkpointing",
}  # fmt: skip


def _read_config(reader: _Reader, data: Any, base_dir: Path) -> TrainingConfig:
    cfg = TrainingConfig(base_dir=base_dir)
    # mflux keeps its own resume state under "statistics"; harmless, so not reported
    top = reader.obj(data, "", _TOP_KEYS, ignored=frozenset({"statistics"}))
    if top is None:
        return cfg
    for key, kind in (("model", "str"), ("seed", "int"), ("steps", "int"), ("guidance", "number"),
                      ("width", "int"), ("height", "int")):
        reader.read(top, key, "", kind, cfg)
    # mflux requires the key; missing simply means no quantization here
    if top.get("quantize") is None:
        cfg.quantize = None
    else:
        reader.read(top, "quantize", "", "int", cfg)
    if "gradient_checkpointing" in top:
        reader.read(top, "gradient_checkpointing", "", "bool", cfg)

    loop = _section(reader, top, "training_loop", {"num_epochs", "batch_size"}, {"iterator_state_path"})
    if loop is not None:
        reader.read(loop, "num_epochs", "training_loop", "int", cfg.training_loop)
        reader.read(loop, "batch_size", "training_loop", "int", cfg.training_loop)
    optimizer = _section(reader, top, "optimizer", {"name", "learning_rate"}, {"state_path"})
    if optimizer is not None:
        if reader.read(optimizer, "name", "optimizer", "str", cfg.optimizer):
            cfg.optimizer.name = canonical_optimizer(cfg.optimizer.name) or cfg.optimizer.name
        reader.read(optimizer, "learning_rate", "optimizer", "number", cfg.optimizer)
    save = _section(reader, top, "save", {"output_path", "checkpoint_frequency"})
    if save is not None:
        reader.read(save, "output_path", "save", "str", cfg.save)
        reader.read(save, "checkpoint_frequency", "save", "int", cfg.save)
    if top.get("instrumentation") is not None:
        raw = reader.obj(top["instrumentation"], "instrumentation",
                         {"plot_frequency", "generate_image_frequency", "validation_prompt"})
        if raw is not None:
            cfg.instrumentation = Instrumentation()
            for key, kind in (("plot_frequency", "int"), ("generate_image_frequency", "int"),
                              ("validation_prompt", "str")):
                reader.read(raw, key, "instrumentation", kind, cfg.instrumentation)
    layers = _section(reader, top, "lora_layers", {"transformer_blocks", "single_transformer_blocks"}, {"state_path"})
    if layers is not None:
        cfg.lora_layers = LoraLayers()
        for kind in ("transformer_blocks", "single_transformer_blocks"):
            if layers.get(kind) is not None:  # mflux skips a null block kind too
                setattr(cfg.lora_layers, kind, _read_block_spec(reader, layers[kind], f"lora_layers.{kind}"))
    examples = _section(reader, top, "examples", {"path", "images"})
    if examples is not None:
        reader.read(examples, "path", "examples", "str", cfg.examples)
        _read_images(reader, examples, cfg.examples)
    return cfg


def _section(reader: _Reader, top: dict, key: str, known: set[str], ignored: set[str] = frozenset()) -> dict | None:
    if key not in top:
        reader.problem(key, f"{key}: missing; add the \"{key}\" section, e.g. {show_value(_plain(getattr(TrainingConfig(), key)))}")
        return None
    return reader.obj(top[key], key, known, frozenset(ignored))


def _read_block_spec(reader: _Reader, raw: Any, path: str) -> LoraBlockSpec:
    spec = LoraBlockSpec(BlockRange(), [], 4)
    block = reader.obj(raw, path, {"block_range", "layer_types", "lora_rank", "indices"})
    if block is None:
        return spec
    reader.read(block, "lora_rank", path, "int", spec)
    if reader.read(block, "layer_types", path, "list", spec):
        for i, name in enumerate(spec.layer_types):
            if not isinstance(name, str):
                reader.problem(f"{path}.layer_types[{i}]",
                               f"{path}.layer_types[{i}] = {show_value(name)}: must be a layer name in quotes, e.g. \"attn.to_q\"")
        spec.layer_types = [name for name in spec.layer_types if isinstance(name, str)]
    where = f"{path}.block_range"
    if "block_range" not in block and "indices" not in block and where not in reader.misspelled:
        reader.problem(where, f'{where}: missing; add "block_range": {{"start": 0, "end": 38}} or {{"indices": [0, 1, 2]}}')
        return spec
    block_range = reader.obj(block.get("block_range", {}), where, {"start", "end", "indices"})
    if block_range is None:
        return spec
    # mflux nests "indices" inside block_range; a bare "indices" next to it is accepted too
    indices, indices_path = block_range.get("indices"), f"{where}.indices"
    if indices is None and "indices" in block:
        indices, indices_path = block["indices"], f"{path}.indices"
    if indices is not None:
        if "start" in block_range or "end" in block_range:
            reader.problem(where, f"{where}: has both start/end and indices; keep one of them")
        elif not isinstance(indices, list) or not indices:
            reader.problem(indices_path, f"{indices_path} = {show_value(indices)}: must be a non-empty list of block numbers, e.g. [0, 1, 7]")
        else:
            spec.block_range.indices = []
            for i, index in enumerate(indices):
                value, error = _coerce(index, "int")
                if error:
                    reader.problem(f"{indices_path}[{i}]", f"{indices_path}[{i}] = {show_value(index)}: {error}, e.g. 7")
                else:
                    spec.block_range.indices.append(value)
        return spec
    full = BlockRange(0, FLUX1_SINGLE_BLOCKS if path.endswith("single_transformer_blocks") else FLUX1_JOINT_BLOCKS)
    spec.block_range = dataclasses.replace(full)
    ok_start = reader.read(block_range, "start", where, "int", spec.block_range)
    ok_end = reader.read(block_range, "end", where, "int", spec.block_range)
    if not (ok_start and ok_end):  # keep the broken range from producing more complaints
        spec.block_range = full
    return spec


def _read_images(reader: _Reader, examples: dict, target: Examples) -> None:
    if not reader.read(examples, "images", "examples", "list", target):
        target.images = [ExampleImage()]  # the problem is already reported; don't also say "empty"
        return
    raw_images, target.images = target.images, []
    for i, raw in enumerate(raw_images):
        where = f"examples.images[{i}]"
        entry = ExampleImage()
        item = reader.obj(raw, where, {"image", "prompt", "crop"})
        if item is not None:
            reader.read(item, "image", where, "str", entry)
            reader.read(item, "prompt", where, "str", entry)
            if item.get("crop") is not None:
                entry.crop = _read_crop(reader, item["crop"], f"{where}.crop")
        target.images.append(entry)


def _read_crop(reader: _Reader, raw: Any, path: str) -> tuple[int, int, int, int] | None:
    """[left, top, width, height] with positive size; the image's own bounds are checked when it is opened."""
    if (isinstance(raw, list) and len(raw) == 4 and all(isinstance(v, int) and not isinstance(v, bool) for v in raw)
            and raw[0] >= 0 and raw[1] >= 0 and raw[2] > 0 and raw[3] > 0):
        return tuple(raw)
    reader.problem(path, f"{path} = {show_value(raw)}: use [left, top, width, height] in pixels, e.g. [0, 0, 512, 512]")
    return None


def parse_config(data: Any, base_dir: str | Path | None = None, *, source: str | None = None,
                 num_joint_blocks: int | None = FLUX1_JOINT_BLOCKS,
                 num_single_blocks: int | None = FLUX1_SINGLE_BLOCKS) -> TrainingConfig:
    """The config in `data` (parsed JSON), relative paths starting at `base_dir`.

    Raises ConfigError listing every problem. Block numbers are checked against
    FLUX.1 (19/38) unless other limits are given; None skips that check (for a
    model whose size is not known yet: call `validate` once it is).
    """
    reader = _Reader()
    cfg = _read_config(reader, data, Path(base_dir or Path.cwd()).expanduser().resolve())
    broken = [path for path, _ in reader.problems]
    later = [(path, message) for path, message in value_problems(cfg, num_joint_blocks, num_single_blocks)
             if not any(_related(path, b) for b in broken)]
    problems = sorted(reader.problems + later, key=lambda problem: _KEY_ORDER.get(re.split(r"[.\[]", problem[0])[0], 0))
    if problems:
        raise ConfigError([message for _, message in problems], source)
    cfg.unknown_keys = reader.unknown
    for message in reader.unknown:
        logger.warning("%s%s", f"{source}: " if source else "", message)
    return cfg


_KEY_ORDER = {key: i for i, key in enumerate((
    "", "model", "seed", "steps", "guidance", "quantize", "width", "height", "gradient_checkpointing",
    "training_loop", "optimizer", "save", "instrumentation", "lora_layers", "examples"))}


def _related(path: str, other: str) -> bool:
    """One path inside the other: a problem there would repeat one already reported."""
    def inside(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or a.startswith(b + "[")
    if not other:  # the whole config was unreadable
        return True
    return bool(path) and (inside(path, other) or inside(other, path))


def load_config(path: str | Path, *, num_joint_blocks: int | None = FLUX1_JOINT_BLOCKS,
                num_single_blocks: int | None = FLUX1_SINGLE_BLOCKS) -> TrainingConfig:
    """Reads a training config file as is (the guide's configs load unchanged)."""
    path = Path(path).expanduser()
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: Windows Notepad starts UTF-8 files with a BOM
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found; check the path"], source) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([f"{path}: cannot be read ({error}); it must be a UTF-8 JSON text file"], source) from None
    if not text.strip():
        raise ConfigError([f"{path}: the file is empty; write a training config into it, e.g. a copy of "
                           f"{TEMPLATES_DIR / 'pets.json'}"], source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError([_json_problem(error, text)], source) from None
    return parse_config(data, path.resolve().parent, source=source, num_joint_blocks=num_joint_blocks,
                        num_single_blocks=num_single_blocks)


def _json_problem(error: json.JSONDecodeError, text: str) -> str:
    line = text.splitlines()[error.lineno - 1].strip() if text.strip() else ""
    hint = "check for a missing comma, quote or bracket there"
    if "property name" in error.msg or "Expecting value" in error.msg:
        hint = "a comma before } or ] is not allowed in JSON, and keys need double quotes; " + hint
    shown = f" ({line[:60]!r})" if line else ""
    return f"not valid JSON at line {error.lineno}, column {error.colno}{shown}: {error.msg}; {hint}"
