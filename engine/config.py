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
import difflib
import json
import logging
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

logger = logging.getLogger(__name__)

FLUX1_JOINT_BLOCKS = 19
FLUX1_SINGLE_BLOCKS = 38

# diffusers names; lora_targets() always answers with these
JOINT_LAYER_TYPES = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "norm1.linear", "norm1_context.linear",
)  # fmt: skip
SINGLE_LAYER_TYPES = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")
# mflux's own spellings of joint-block layers, accepted and written back as the user wrote them
MFLUX_JOINT_ALIASES = {
    "attn.to_out": "attn.to_out.0",
    "ff.linear1": "ff.net.0.proj",
    "ff.linear2": "ff.net.2",
    "ff_context.linear1": "ff_context.net.0.proj",
    "ff_context.linear2": "ff_context.net.2",
}
# what mlx.optimizers offers (mflux itself knows only Adam and AdamW)
OPTIMIZERS = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "AdaDelta", "Adamax", "Lion", "Adafactor", "Muon")
QUANTIZE_BITS = (3, 4, 5, 6, 8)
MODEL_ALIASES = {
    "dev": "black-forest-labs/FLUX.1-dev",
    "schnell": "black-forest-labs/FLUX.1-schnell",
    "krea-dev": "black-forest-labs/FLUX.1-Krea-dev",
    "dev-krea": "black-forest-labs/FLUX.1-Krea-dev",
    "flux.1-dev": "black-forest-labs/FLUX.1-dev",
    "flux.1-schnell": "black-forest-labs/FLUX.1-schnell",
}
TINY_MODEL = "tiny"
TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "templates"
TEMPLATE_DESCRIPTIONS = {
    "pets": "a dog, a cat, any animal: light LoRA on every single block (rank 4)",
    "people": "a person's face and likeness: later single blocks, rank 8, gentler learning rate",
    "style": "an art style: joint blocks 5-14 attention (rank 16) and later single blocks (rank 8)",
    "object": "a product or thing with fine detail (logos, lettering): all single blocks and late joint attention, rank 8",
}
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _field(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING):
    """A dataclass field that documents itself (mlx-lm's TrainingArgs style)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class TrainingLoop:
    num_epochs: int = _field(100, "How many times every image is seen; 50-200 is typical.")
    batch_size: int = _field(1, "Images per optimizer step; 1 keeps memory lowest.")


@dataclass
class OptimizerSpec:
    name: str = _field("AdamW", "Optimizer from mlx.optimizers; mflux itself only knows Adam and AdamW.")
    learning_rate: float = _field(1e-4, "Step size; 1e-5 to 1e-3, 1e-4 is a safe start.")


@dataclass
class SaveSpec:
    output_path: str = _field("~/Desktop/my_lora", "Folder for checkpoints, previews and the LoRA; ~ expands.")
    checkpoint_frequency: int = _field(20, "Optimizer steps between checkpoint zips (resume points).")


@dataclass
class Instrumentation:
    plot_frequency: int = _field(5, "Optimizer steps between loss-plot updates.")
    generate_image_frequency: int = _field(20, "Optimizer steps between preview images (each costs a full generation).")
    validation_prompt: str = _field("photo of sks dog", "Prompt of the preview images; include the trigger word.")


@dataclass
class BlockRange:
    start: int | None = _field(None, "First block to train (counting from 0).")
    end: int | None = _field(None, "Block after the last one trained (exclusive): 0-38 trains all 38.")
    indices: list[int] | None = _field(None, "Exact blocks to train, instead of start/end, e.g. [0, 1, 7].")

    def blocks(self) -> list[int]:
        if self.indices is not None:
            return list(self.indices)
        return list(range(self.start or 0, self.end or 0))


@dataclass
class LoraBlockSpec:
    block_range: BlockRange = _field(help="Which blocks get LoRA layers.", factory=lambda: BlockRange(0, 38))
    layer_types: list[str] = _field(help="Linear layers inside each block that get a LoRA.", factory=list)
    lora_rank: int = _field(4, "Size of each LoRA; 4-16 typical, higher learns more and costs memory.")


@dataclass
class LoraLayers:
    transformer_blocks: LoraBlockSpec | None = _field(
        None, "Joint (text+image) blocks, 19 in FLUX.1: early, general features; slower to train."
    )
    single_transformer_blocks: LoraBlockSpec | None = _field(
        None, "Single blocks, 38 in FLUX.1: later, specific details; the usual choice."
    )


@dataclass
class ExampleImage:
    image: str = _field("01.jpg", "Image file, relative to examples.path.")
    prompt: str = _field("photo of sks dog", "Caption with the trigger word, e.g. 'photo of sks dog'.")
    crop: tuple[int, int, int, int] | None = _field(
        None, "Ours: [left, top, width, height] of the region to train on, in the photo's pixels; "
              "default a centre crop to the training aspect.")


@dataclass
class Examples:
    path: str = _field("images/", "Folder of the images, relative to the config file's folder, or absolute.")
    images: list[ExampleImage] = _field(help="The training images and their prompts; 10-20 is ideal.", factory=list)


def _pets_layers() -> LoraLayers:
    return LoraLayers(
        single_transformer_blocks=LoraBlockSpec(
            BlockRange(0, 38), ["proj_out", "proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"], 4
        )
    )


@dataclass
class TrainingConfig:
    model: str = _field("dev", "Base model: dev, schnell, a Hugging Face repo id, a local folder, or tiny.")
    seed: int = _field(42, "Seeds the LoRA init and every random draw, so runs repeat exactly.")
    steps: int = _field(20, "Size of the noise-level grid training draws from; also the preview's denoising steps.")
    guidance: float = _field(3.0, "Guidance value fed to dev's guidance embedder (schnell ignores it).")
    quantize: int | None = _field(4, "Bits for the frozen base model (3, 4, 5, 6, 8) or null for none; 4 saves most memory.")
    width: int = _field(512, "Training width in pixels, a multiple of 16.")
    height: int = _field(512, "Training height in pixels, a multiple of 16.")
    training_loop: TrainingLoop = _field(help="How long to train.", factory=TrainingLoop)
    optimizer: OptimizerSpec = _field(help="How the LoRA weights are updated.", factory=OptimizerSpec)
    save: SaveSpec = _field(help="Where and how often to save.", factory=SaveSpec)
    instrumentation: Instrumentation | None = _field(None, "Optional loss plots and preview images during training.")
    lora_layers: LoraLayers = _field(help="Which layers of the transformer learn.", factory=_pets_layers)
    examples: Examples = _field(help="The training images and their prompts.", factory=Examples)
    gradient_checkpointing: bool = _field(False, "Recompute activations in the backward pass: far less memory, ~30% slower.")
    # not part of the JSON: where relative paths start, and what parsing noticed
    base_dir: Path = field(default_factory=Path.cwd, compare=False, repr=False)
    unknown_keys: list[str] = field(default_factory=list, compare=False, repr=False)

    @property
    def examples_dir(self) -> Path:
        path = Path(self.examples.path).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def image_paths(self) -> list[Path]:
        return [self.examples_dir / example.image for example in self.examples.images]

    @property
    def output_dir(self) -> Path:
        # relative to the config file (mflux: the working directory), so a run does not depend on where it starts
        path = Path(self.save.output_path).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def prompts(self) -> list[str]:
        return [example.prompt for example in self.examples.images]


# ---------------------------------------------------------------- reading JSON

_MISSING = object()
_KIND_EXAMPLES = {"int": "42", "number": "0.0001", "str": '"text"', "bool": "true", "list": "[...]", "object": "{...}"}


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class _Reader:
    """Walks the raw JSON and collects every problem instead of stopping at the first."""

    def __init__(self):
        self.problems: list[tuple[str, str]] = []  # (key path, message)
        self.unknown: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def obj(self, raw: Any, path: str, known: set[str], ignored: frozenset[str] = frozenset()) -> dict | None:
        if not isinstance(raw, dict):
            where = path or "the config"
            self.problem(path, f"{where} = {_show(raw)}: must be an object {{...}} of keys and values")
            return None
        for key in raw:
            if key not in known and key not in ignored:
                near = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f' (did you mean "{near[0]}"?)' if near else ""
                self.unknown.append(f'unknown key "{_join(path, key)}" ignored{hint}')
        return raw

    def read(self, raw: dict, key: str, path: str, kind: str, target: Any, attr: str | None = None,
             required: bool = True) -> bool:
        """Copies raw[key] onto target.attr if it has the right type; True if it did."""
        attr = attr or key
        where = _join(path, key)
        if key not in raw:
            if required:
                example = _show(_plain(getattr(target, attr)))
                self.problem(where, f'{where}: missing; add "{key}": {example}')
            return False
        value, error = _coerce(raw[key], kind)
        if error:
            self.problem(where, f"{where} = {_show(raw[key])}: {error}, e.g. \"{key}\": {_example(target, attr, kind)}")
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
    return _show(_plain(default)) if default is not None else _KIND_EXAMPLES[kind]


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
        reader.problem(key, f"{key}: missing; add the \"{key}\" section, e.g. {_show(_plain(getattr(TrainingConfig(), key)))}")
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
                               f"{path}.layer_types[{i}] = {_show(name)}: must be a layer name in quotes, e.g. \"attn.to_q\"")
        spec.layer_types = [name for name in spec.layer_types if isinstance(name, str)]
    where = f"{path}.block_range"
    if "block_range" not in block and "indices" not in block:
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
            reader.problem(indices_path, f"{indices_path} = {_show(indices)}: must be a non-empty list of block numbers, e.g. [0, 1, 7]")
        else:
            spec.block_range.indices = []
            for i, index in enumerate(indices):
                value, error = _coerce(index, "int")
                if error:
                    reader.problem(f"{indices_path}[{i}]", f"{indices_path}[{i}] = {_show(index)}: {error}, e.g. 7")
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
    reader.problem(path, f"{path} = {_show(raw)}: use [left, top, width, height] in pixels, e.g. [0, 0, 512, 512]")
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
    later = [(path, message) for path, message in _value_problems(cfg, num_joint_blocks, num_single_blocks)
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
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found; check the path"], source) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([f"{path}: cannot be read ({error}); it must be a UTF-8 JSON text file"], source) from None
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


# ---------------------------------------------------------------- checking values

def canonical_optimizer(name: str) -> str | None:
    """'adamw' -> 'AdamW'; None if mlx.optimizers has no such optimizer."""
    return {known.lower(): known for known in OPTIMIZERS}.get(name.strip().lower())


def canonical_layer_type(name: str, joint: bool) -> str | None:
    """The diffusers name of a layer type (mflux spellings mapped), None if unknown there."""
    if joint:
        name = MFLUX_JOINT_ALIASES.get(name, name)
        return name if name in JOINT_LAYER_TYPES else None
    return name if name in SINGLE_LAYER_TYPES else None


def model_source(model: str, base_dir: Path | None = None) -> tuple[str, str]:
    """Where a model name points: ("tiny", "tiny"), ("hub", repo_id) or ("local", folder); ("unknown", name)."""
    if model.strip().lower() == TINY_MODEL:
        return "tiny", TINY_MODEL
    if model.strip().lower() in MODEL_ALIASES:
        return "hub", MODEL_ALIASES[model.strip().lower()]
    folder = Path(model).expanduser()
    if not folder.is_absolute() and base_dir is not None:
        folder = base_dir / folder
    if model and folder.is_dir():
        return "local", str(folder.resolve())
    if _HUB_REPO_ID.match(model):
        return "hub", model
    return "unknown", model


def _value_problems(cfg: TrainingConfig, num_joint: int | None, num_single: int | None) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []

    def at_least(path: str, value: int | float, low: int, why: str) -> None:
        if value < low:
            problems.append((path, f"{path} = {_show(value)}: must be at least {low} ({why})"))

    if model_source(cfg.model, cfg.base_dir)[0] == "unknown":
        problems.append(("model", f'model = {_show(cfg.model)}: not a model; use "dev", "schnell", a Hugging Face '
                                  'repo id like "black-forest-labs/FLUX.1-dev", an existing local folder, or "tiny"'))
    if cfg.seed < 0:
        problems.append(("seed", f"seed = {cfg.seed}: must be 0 or more, e.g. 42"))
    at_least("steps", cfg.steps, 1, "the noise-level grid needs at least one step; 20 is usual for dev")
    if not math.isfinite(cfg.guidance) or cfg.guidance < 0:
        problems.append(("guidance", f"guidance = {_show(cfg.guidance)}: must be 0 or more; 3.0-4.0 suits dev"))
    if cfg.quantize is not None and cfg.quantize not in QUANTIZE_BITS:
        problems.append(("quantize", f"quantize = {_show(cfg.quantize)}: use null (no quantization) or one of 3, 4, 5, 6, 8"))
    for key in ("width", "height"):
        value = getattr(cfg, key)
        if value < 16:
            problems.append((key, f"{key} = {value}: must be at least 16 pixels; 512 is usual"))
        elif value % 16:
            lower = value // 16 * 16
            problems.append((key, f"{key} = {value}: must be a multiple of 16, use {lower} or {lower + 16}"))
    at_least("training_loop.num_epochs", cfg.training_loop.num_epochs, 1, "each epoch shows every image once")
    at_least("training_loop.batch_size", cfg.training_loop.batch_size, 1, "images per optimizer step")
    if canonical_optimizer(cfg.optimizer.name) is None:
        near = difflib.get_close_matches(cfg.optimizer.name.lower(), [o.lower() for o in OPTIMIZERS], n=1)
        guess = f'did you mean "{canonical_optimizer(near[0])}"? ' if near else ""
        problems.append(("optimizer.name", f"optimizer.name = {_show(cfg.optimizer.name)}: unknown optimizer; "
                                           f"{guess}valid: {', '.join(OPTIMIZERS)}"))
    if not math.isfinite(cfg.optimizer.learning_rate) or cfg.optimizer.learning_rate <= 0:
        problems.append(("optimizer.learning_rate", f"optimizer.learning_rate = {_show(cfg.optimizer.learning_rate)}: "
                                                    "must be above 0; 1e-4 is a safe start"))
    if not cfg.save.output_path.strip():
        problems.append(("save.output_path", 'save.output_path = "": name a folder, e.g. "~/Desktop/my_lora"'))
    at_least("save.checkpoint_frequency", cfg.save.checkpoint_frequency, 1, "it counts optimizer steps between checkpoints")
    if cfg.instrumentation is not None:
        at_least("instrumentation.plot_frequency", cfg.instrumentation.plot_frequency, 1,
                 "it counts optimizer steps between loss plots")
        at_least("instrumentation.generate_image_frequency", cfg.instrumentation.generate_image_frequency, 1,
                 "it counts optimizer steps between preview images")
        if not cfg.instrumentation.validation_prompt.strip():
            problems.append(("instrumentation.validation_prompt",
                             'instrumentation.validation_prompt = "": write a prompt with the trigger word, e.g. "photo of sks dog"'))
    problems += _lora_problems(cfg.lora_layers, num_joint, num_single)
    if not cfg.examples.images:
        problems.append(("examples.images", 'examples.images = []: add at least one {"image": "01.jpg", "prompt": "photo of sks dog"}'))
    for i, example in enumerate(cfg.examples.images):
        where = f"examples.images[{i}]"
        if not example.image.strip():
            problems.append((f"{where}.image", f'{where}.image = "": name the image file, e.g. "01.jpg"'))
        if not example.prompt.strip():
            problems.append((f"{where}.prompt", f'{where}.prompt = {_show(example.prompt)}: write a caption with the '
                                                'trigger word, e.g. "photo of sks dog"'))
    return problems


def _lora_problems(layers: LoraLayers, num_joint: int | None, num_single: int | None) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    specs = [("transformer_blocks", layers.transformer_blocks, num_joint, "joint"),
             ("single_transformer_blocks", layers.single_transformer_blocks, num_single, "single")]
    if all(spec is None for _, spec, _, _ in specs):
        problems.append(("lora_layers", 'lora_layers = {}: add "single_transformer_blocks" (or "transformer_blocks"), '
                                        'e.g. {"block_range": {"start": 0, "end": 38}, "layer_types": ["attn.to_q"], "lora_rank": 4}'))
    for kind, spec, limit, label in specs:
        if spec is None:
            continue
        path = f"lora_layers.{kind}"
        if spec.lora_rank < 1:
            problems.append((f"{path}.lora_rank", f"{path}.lora_rank = {spec.lora_rank}: must be at least 1; 4-16 is typical"))
        if not spec.layer_types:
            problems.append((f"{path}.layer_types", f"{path}.layer_types = []: name at least one layer, e.g. [\"attn.to_q\"]"))
        for i, name in enumerate(spec.layer_types):
            if canonical_layer_type(name, kind == "transformer_blocks") is None:
                problems.append((f"{path}.layer_types[{i}]", f"{path}.layer_types[{i}] = {_show(name)}: "
                                                             + _layer_type_fix(name, kind == "transformer_blocks")))
        problems += _block_range_problems(spec.block_range, f"{path}.block_range", limit, label)
    return problems


def _layer_type_fix(name: str, joint: bool) -> str:
    valid = list(JOINT_LAYER_TYPES) + list(MFLUX_JOINT_ALIASES) if joint else list(SINGLE_LAYER_TYPES)
    if canonical_layer_type(name, not joint) is not None:
        other = "single_transformer_blocks" if joint else "transformer_blocks"
        return f"only {other} have this layer; valid here: {', '.join(valid)}"
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    guess = f'did you mean "{near[0]}"? ' if near else ""
    return f"unknown layer type; {guess}valid here: {', '.join(valid)}"


def _block_range_problems(block_range: BlockRange, path: str, limit: int | None, label: str) -> list[tuple[str, str]]:
    owner = "FLUX.1" if limit == (FLUX1_JOINT_BLOCKS if label == "joint" else FLUX1_SINGLE_BLOCKS) else "this model"
    has = f"{owner} has {limit} {label} blocks"
    problems = []
    if block_range.indices is not None:
        for i, index in enumerate(block_range.indices):
            if index < 0 or (limit is not None and index >= limit):
                top = f"use 0 to {limit - 1}" if limit is not None else "use 0 or more"
                why = f"{has}, numbered from 0, " if limit is not None else ""
                problems.append((f"{path}.indices[{i}]", f"{path}.indices[{i}] = {index}: {why}{top}"))
        return problems
    start, end = block_range.start or 0, block_range.end or 0
    if start < 0:
        problems.append((f"{path}.start", f"{path}.start = {start}: must be 0 or more (blocks are numbered from 0)"))
    if limit is not None and end > limit:
        problems.append((f"{path}.end", f"{path}.end = {end}: {has}, use at most {limit}"))
    if start >= end:
        fixed = {"start": end, "end": start} if start > end else {"start": start, "end": start + 1}
        problems.append((path, f"{path} = {_show({'start': start, 'end': end})}: start must be below end "
                               f"(end is exclusive, so {_show(fixed)} trains blocks {fixed['start']} to {fixed['end'] - 1})"))
    return problems


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
        problems += _missing_files(cfg)
    if problems:
        raise ConfigError(problems)
    return list(cfg.unknown_keys) + _warnings(checked, trigger)


def _missing_files(cfg: TrainingConfig) -> list[str]:
    if not isinstance(cfg.examples.path, str):
        return []
    problems = []
    for i, example in enumerate(cfg.examples.images):
        if isinstance(example.image, str) and example.image and not (cfg.examples_dir / example.image).is_file():
            problems.append(f"examples.images[{i}].image = {_show(example.image)}: no file at "
                            f"{cfg.examples_dir / example.image}; check examples.path ({_show(cfg.examples.path)}) "
                            "and the file name")
    return problems


def _warnings(cfg: TrainingConfig, trigger: str | None) -> list[str]:
    warnings = []
    rate = cfg.optimizer.learning_rate
    if not 1e-5 <= rate <= 1e-3:
        warnings.append(f"optimizer.learning_rate = {rate:g}: outside the usual 1e-5 to 1e-3; "
                        + ("training may barely move" if rate < 1e-5 else "training may diverge or overfit fast"))
    if cfg.optimizer.name not in ("Adam", "AdamW"):
        warnings.append(f"optimizer.name = {_show(cfg.optimizer.name)}: mflux itself only trains with Adam or AdamW")
    for kind in ("transformer_blocks", "single_transformer_blocks"):
        spec = getattr(cfg.lora_layers, kind)
        if spec is None:
            continue
        if spec.lora_rank > 64:
            warnings.append(f"lora_layers.{kind}.lora_rank = {spec.lora_rank}: above 64 costs much memory and rarely "
                            "helps a DreamBooth subject; 4-16 is typical")
        canonical = [canonical_layer_type(name, kind == "transformer_blocks") for name in spec.layer_types]
        for name in sorted({n for n in canonical if canonical.count(n) > 1}):
            warnings.append(f'lora_layers.{kind}.layer_types: "{name}" is listed twice; it is trained once')
        blocks = spec.block_range.blocks()
        for index in sorted({b for b in blocks if blocks.count(b) > 1}):
            warnings.append(f"lora_layers.{kind}.block_range.indices: block {index} is listed twice; it is trained once")
    count = len(cfg.examples.images)
    if count < 5:
        warnings.append(f"examples.images: only {count} image(s); 5-20 work, 10-20 is ideal")
    elif count > 30:
        warnings.append(f"examples.images: {count} images; more than 30 rarely helps a subject and makes epochs long")
    if cfg.training_loop.batch_size > count:
        warnings.append(f"training_loop.batch_size = {cfg.training_loop.batch_size}: more than the {count} image(s); "
                        "batches will hold at most all of them")
    for key in ("width", "height"):
        if getattr(cfg, key) < 256 and model_source(cfg.model, cfg.base_dir)[0] != "tiny":
            warnings.append(f"{key} = {getattr(cfg, key)}: FLUX.1 learns little below 256 pixels; 512 is usual")
    warnings += _trigger_warnings(cfg, trigger)
    return warnings


# words captions use; a token outside them that most prompts share is taken for the trigger
_CAPTION_WORDS = frozenset("""
a an the of in on at with and or by for from to near under over into onto next front back side top behind
is are this that these those my his her their its our your some one two three very
photo photograph picture image shot snapshot closeup close up portrait headshot selfie face body full
style art artwork painting drawing illustration sketch render rendering design pattern texture
dog cat pet puppy kitten animal bird horse rabbit person man woman boy girl child kid baby people
object thing toy product item mug cup bag shoe car bottle
sitting standing lying running walking looking smiling wearing holding playing jumping sleeping
indoor indoors outdoor outdoors inside outside park beach garden grass room table floor street background studio
white black red blue green yellow brown grey gray orange pink purple golden dark bright light colorful
small big large little young old cute happy fluffy high quality detailed realistic natural soft sharp
day night sunset sunlight lighting camera view angle
""".split())
_TOKEN = re.compile(r"[^\s,.;:!?()\[\]{}\"']+")


def prompt_tokens(prompt: str) -> list[str]:
    return [token.lower() for token in _TOKEN.findall(prompt)]


def infer_trigger(prompts: list[str]) -> str | None:
    """The made-up word most prompts share ('sks' in 'photo of sks dog'), None if there is none."""
    token_sets = [set(prompt_tokens(p)) for p in prompts if p.strip()]
    if not token_sets:
        return None
    needed = max(1, math.ceil(len(token_sets) / 2))
    first_seen: dict[str, int] = {}
    for tokens in (prompt_tokens(p) for p in prompts):
        for token in tokens:
            first_seen.setdefault(token, len(first_seen))

    def rare_looking(token: str) -> bool:
        return not re.search(r"[aeiou]", token) or bool(re.search(r"\d|[<>_]", token))

    candidates = []
    for token, order in first_seen.items():
        shared = sum(token in tokens for tokens in token_sets)
        if shared >= needed and token not in _CAPTION_WORDS and not token.isdigit():
            candidates.append((-shared, not rare_looking(token), order, token))
    return min(candidates)[3] if candidates else None


def _trigger_warnings(cfg: TrainingConfig, trigger: str | None) -> list[str]:
    prompts = cfg.prompts
    trigger = (trigger or infer_trigger(prompts) or "").lower()
    if not trigger:
        if len(prompts) >= 2:
            return ["examples.images: no trigger word shared by the prompts; put the same made-up word "
                    '(e.g. "sks") in every prompt so you can call the subject later']
        return []
    warnings = []
    for i, prompt in enumerate(prompts):
        if trigger not in prompt_tokens(prompt):
            warnings.append(f'examples.images[{i}].prompt = {_show(prompt)}: no trigger word "{trigger}"; '
                            f'add it, e.g. "photo of {trigger} ..."')
    if cfg.instrumentation is not None and trigger not in prompt_tokens(cfg.instrumentation.validation_prompt):
        warnings.append(f"instrumentation.validation_prompt = {_show(cfg.instrumentation.validation_prompt)}: "
                        f'no trigger word "{trigger}"; previews will not show what was learned')
    return warnings


# ---------------------------------------------------------------- using the config

def lora_targets(cfg: TrainingConfig, num_joint_blocks: int = FLUX1_JOINT_BLOCKS,
                 num_single_blocks: int = FLUX1_SINGLE_BLOCKS) -> list[tuple[str, int]]:
    """Every layer to wrap, as (module path in diffusers names, rank), e.g. ("single_transformer_blocks.3.attn.to_q", 4)."""
    problems = _lora_problems(cfg.lora_layers, num_joint_blocks, num_single_blocks)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
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
