"""Checking a config's values: the problems that stop a run (with their fixes) and the
warnings about runs that may disappoint (learning rate, image count, the trigger word)."""
from __future__ import annotations

import difflib
import math
import os
import re
import shlex

from engine.config_schema import (
    FLUX1_JOINT_BLOCKS,
    FLUX1_SINGLE_BLOCKS,
    JOINT_LAYER_TYPES,
    MFLUX_JOINT_ALIASES,
    OPTIMIZERS,
    QUANTIZE_BITS,
    SINGLE_LAYER_TYPES,
    BlockRange,
    LoraLayers,
    TrainingConfig,
    canonical_layer_type,
    canonical_optimizer,
    model_source,
    show_value,
)

SEED_LIMIT = 2**64


def value_problems(cfg: TrainingConfig, num_joint: int | None, num_single: int | None) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []

    def at_least(path: str, value: int | float, low: int, why: str) -> None:
        if value < low:
            problems.append((path, f"{path} = {show_value(value)}: must be at least {low} ({why})"))

    if model_source(cfg.model, cfg.base_dir)[0] == "unknown":
        problems.append(("model", f'model = {show_value(cfg.model)}: not a model; use "dev", "schnell", a Hugging Face '
                                  'repo id like "black-forest-labs/FLUX.1-dev", an existing local folder, or "tiny"'))
    if cfg.seed < 0:
        problems.append(("seed", f"seed = {cfg.seed}: must be 0 or more, e.g. 42"))
    elif cfg.seed >= SEED_LIMIT:  # MLX's random key holds 64 bits; a larger seed would crash the run's first step
        problems.append(("seed", f"seed = {cfg.seed}: too large; use 0 to {SEED_LIMIT - 1}, e.g. 42"))
    at_least("steps", cfg.steps, 1, "the noise-level grid needs at least one step; 20 is usual for dev")
    if not math.isfinite(cfg.guidance) or cfg.guidance < 0:
        problems.append(("guidance", f"guidance = {show_value(cfg.guidance)}: must be 0 or more; 3.0-4.0 suits dev"))
    if cfg.quantize is not None and cfg.quantize not in QUANTIZE_BITS:
        problems.append(("quantize", f"quantize = {show_value(cfg.quantize)}: use null (no quantization) or one of 3, 4, 5, 6, 8"))
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
        problems.append(("optimizer.name", f"optimizer.name = {show_value(cfg.optimizer.name)}: unknown optimizer; "
                                           f"{guess}valid: {', '.join(OPTIMIZERS)}"))
    if not math.isfinite(cfg.optimizer.learning_rate) or cfg.optimizer.learning_rate <= 0:
        problems.append(("optimizer.learning_rate", f"optimizer.learning_rate = {show_value(cfg.optimizer.learning_rate)}: "
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
    problems += lora_problems(cfg.lora_layers, num_joint, num_single)
    if not cfg.examples.images:
        problems.append(("examples.images", 'examples.images = []: add at least one {"image": "01.jpg", "prompt": "photo of sks dog"}'))
    for i, example in enumerate(cfg.examples.images):
        where = f"examples.images[{i}]"
        if not example.image.strip():
            problems.append((f"{where}.image", f'{where}.image = "": name the image file, e.g. "01.jpg"'))
        if not example.prompt.strip():
            problems.append((f"{where}.prompt", f'{where}.prompt = {show_value(example.prompt)}: write a caption with the '
                                                'trigger word, e.g. "photo of sks dog"'))
    if cfg.width >= 16 and cfg.height >= 16:
        problems += crop_problems(cfg)
    return problems


def crop_problems(cfg: TrainingConfig) -> list[tuple[str, str]]:
    """Crops outside their photo or of another shape than the training size, found now rather than
    minutes later when the photos are encoded; reads only the headers of photos that have a crop."""
    if all(example.crop is None for example in cfg.examples.images):
        return []
    from engine.crops import CropBox, default_crop, fit_crop  # Pillow loads only for configs with crops
    from engine.errors import ImageError
    from engine.images import displayed_size

    problems = []
    for i, example in enumerate(cfg.examples.images):
        path = cfg.examples_dir / example.image if isinstance(example.image, str) and example.image else None
        if example.crop is None or path is None or not path.is_file():
            continue  # a missing photo is the file check's to report
        try:
            width, height = displayed_size(path)
        except ImageError:
            continue  # reported with its fix when the photo is opened
        box, where = CropBox.of(example.crop), f"examples.images[{i}].crop"
        centred = list(default_crop((width, height), cfg.width, cfg.height))
        # a pixel of rounding is allowed, as engine/crops.py allows it
        misshapen = abs(box.width * cfg.height - box.height * cfg.width) > max(cfg.width, cfg.height)
        if box.right > width or box.bottom > height:
            edges = [f"{side} edge at {edge}" for side, edge, limit in
                     (("right", box.right, width), ("bottom", box.bottom, height)) if edge > limit]
            problems.append((where, f"{where} = {show_value(list(box))}: reaches past the {width}x{height} photo "
                                    f"{path.name} ({', '.join(edges)}); keep left + width <= {width} and top + height <= "
                                    f'{height}, or remove "crop" for the centred box {centred}'))
        elif misshapen:
            fitted = list(fit_crop(box, (width, height), cfg.width, cfg.height))
            problems.append((where, f"{where} = {show_value(list(box))}: a {box.width}x{box.height} box does not have the "
                                    f"shape of the {cfg.width}x{cfg.height} training size, so the photo would be "
                                    f'stretched; use e.g. {fitted}, or remove "crop" for the centred box {centred}'))
    return problems


def lora_problems(layers: LoraLayers, num_joint: int | None, num_single: int | None) -> list[tuple[str, str]]:
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
                problems.append((f"{path}.layer_types[{i}]", f"{path}.layer_types[{i}] = {show_value(name)}: "
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
        problems.append((path, f"{path} = {show_value({'start': start, 'end': end})}: start must be below end "
                               f"(end is exclusive, so {show_value(fixed)} trains blocks {fixed['start']} to {fixed['end'] - 1})"))
    return problems


def missing_files(cfg: TrainingConfig) -> list[str]:
    if not isinstance(cfg.examples.path, str):
        return []
    problems = []
    for i, example in enumerate(cfg.examples.images):
        if not isinstance(example.image, str) or not example.image:
            continue
        path = cfg.examples_dir / example.image
        if not path.is_file():
            problems.append(f"examples.images[{i}].image = {show_value(example.image)}: no file at "
                            f"{path}; check examples.path ({show_value(cfg.examples.path)}) and the file name")
        elif not os.access(path, os.R_OK):
            problems.append(f"examples.images[{i}].image = {show_value(example.image)}: no permission to read {path}; "
                            f"fix the file's permissions (its owner can run chmod a+r {shlex.quote(str(path))})")
    return problems


def config_warnings(cfg: TrainingConfig, trigger: str | None) -> list[str]:
    warnings = []
    rate = cfg.optimizer.learning_rate
    if not 1e-5 <= rate <= 1e-3:
        warnings.append(f"optimizer.learning_rate = {rate:g}: outside the usual 1e-5 to 1e-3; "
                        + ("training may barely move" if rate < 1e-5 else "training may diverge or overfit fast"))
    if cfg.optimizer.name not in ("Adam", "AdamW"):
        warnings.append(f"optimizer.name = {show_value(cfg.optimizer.name)}: mflux itself only trains with Adam or AdamW")
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
    warnings += trigger_warnings(cfg, trigger)
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


def trigger_warnings(cfg: TrainingConfig, trigger: str | None) -> list[str]:
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
            warnings.append(f'examples.images[{i}].prompt = {show_value(prompt)}: no trigger word "{trigger}"; '
                            f'add it, e.g. "photo of {trigger} ..."')
    if cfg.instrumentation is not None and trigger not in prompt_tokens(cfg.instrumentation.validation_prompt):
        warnings.append(f"instrumentation.validation_prompt = {show_value(cfg.instrumentation.validation_prompt)}: "
                        f'no trigger word "{trigger}"; previews will not show what was learned')
    return warnings
