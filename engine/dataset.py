"""The training set: every image VAE-encoded once, every distinct prompt encoded once.

Encodings are cached on disk keyed by the image's bytes, its crop, the training
size and the model, so a resume or a rerun skips straight to training. The
iterator draws every random number of the run from one seeded generator whose
state is saved in checkpoints: resuming continues the same sequence.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from engine.flux.latents import pack_latents
from engine.errors import ImageError
from engine.crops import CropBox, check_crop, default_crop
from engine.images import content_hash, crop_and_resize, open_image
from engine.paths import cache_dir

log = logging.getLogger(__name__)

ENCODING_VERSION = "1"


@dataclass
class Example:
    image_path: Path
    prompt: str
    latents: mx.array  # packed, normalized (tokens, 64)
    prompt_key: str


@dataclass
class EncodedPrompt:
    hidden: mx.array  # (T, D)
    pooled: mx.array  # (P,)


class TrainingSet:
    """Encoded examples and prompts; nothing here needs the encoders once built."""

    def __init__(self, examples: list[Example], prompts: dict[str, EncodedPrompt]):
        self.examples = examples
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: list[int]) -> tuple[mx.array, mx.array, mx.array]:
        """(latents (B, N, C), prompt hidden (B, T, D), pooled (B, P)) for these examples."""
        chosen = [self.examples[i] for i in indices]
        latents = mx.stack([e.latents for e in chosen])
        hidden = mx.stack([self.prompts[e.prompt_key].hidden for e in chosen])
        pooled = mx.stack([self.prompts[e.prompt_key].pooled for e in chosen])
        return latents, hidden, pooled


def model_identity(model) -> str:
    """What makes two encodings comparable: the model's files and the compute dtype."""
    parts = [str(Path(model.path).resolve()), str(model.dtype), str(model.quantize)]
    for sub in ("vae", "text_encoder", "text_encoder_2"):
        for path in sorted((Path(model.path) / sub).glob("*")):
            if path.is_file():
                stat = path.stat()
                parts.append(f"{sub}/{path.name}:{stat.st_size}:{int(stat.st_mtime)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build_training_set(model, examples: list[tuple[Path, str, CropBox | None]], width: int, height: int,
                       extra_prompts: list[str] = (), progress: Callable[[str, int, int], None] | None = None,
                       cache: Path | None = None, warn: Callable[[str], None] | None = None,
                       ) -> tuple[TrainingSet, dict[str, EncodedPrompt]]:
    """Encode (image, prompt, crop) examples at width x height; also `extra_prompts` (validation).

    Returns the training set and the encodings of the extra prompts. `warn`
    hears about photos that train poorly (the trainer turns them into events).
    """
    progress = progress or (lambda phase, done, total: None)
    warn = warn or log.warning
    cache = cache or (cache_dir() / "encodings")
    cache.mkdir(parents=True, exist_ok=True)
    identity = model_identity(model)

    prompts: dict[str, EncodedPrompt] = {}
    wanted = list(dict.fromkeys([prompt for _, prompt, _ in examples] + list(extra_prompts)))
    for done, prompt in enumerate(wanted):
        key = _digest(identity, "prompt", prompt, model.t5_max_length)
        prompts[prompt] = _cached(cache / f"prompt-{key}.safetensors", lambda p=prompt: _encode_prompt(model, p))
        progress("encode prompts", done + 1, len(wanted))

    encoded: list[Example] = []
    for done, (path, prompt, crop) in enumerate(examples):
        image = open_image(path)
        box = crop or default_crop(image.size, width, height)
        try:
            check_crop(box, image.size, width, height)
        except ValueError as error:
            raise ImageError(f"{path}: {error}",
                             "fix that image's crop in the config (or remove it for a centre crop)") from error
        region = CropBox.of(box)
        if region.width < width or region.height < height:
            warn(_upscale_warning(path, image.size, region, width, height))
        key = _digest(identity, "image", content_hash(path), tuple(box), width, height)
        entry = _cached(cache / f"image-{key}.safetensors",
                        lambda i=image, b=box: _encode_image(model, i, b, width, height))
        encoded.append(Example(image_path=Path(path), prompt=prompt, latents=entry, prompt_key=prompt))
        progress("encode images", done + 1, len(examples))
    extra = {prompt: prompts[prompt] for prompt in extra_prompts}
    return TrainingSet(encoded, prompts), extra


def _upscale_warning(path: Path, size: tuple[int, int], box: CropBox, width: int, height: int) -> str:
    # enlarged pixels teach the LoRA blur; still trained, since the user chose the photo
    region = "photo" if box.as_tuple() == (0, 0, *size) else "crop"
    return (f"{Path(path).name}: the {region} is only {box.width}x{box.height} pixels and is enlarged to "
            f"{width}x{height}, so the LoRA learns a blurry subject; use a photo at least {width}x{height} pixels")


def _encode_prompt(model, prompt: str) -> dict[str, mx.array]:
    hidden, pooled = model.encode_prompts([prompt])
    return {"hidden": hidden[0], "pooled": pooled[0]}


def _encode_image(model, image, box, width: int, height: int) -> dict[str, mx.array]:
    pixels = crop_and_resize(image, box, width, height)  # (H, W, 3) float32 in [-1, 1]
    mean = model.vae.encode(mx.array(pixels)[None].astype(model.dtype))
    return {"latents": pack_latents(model.vae.normalize(mean.astype(mx.float32)))[0]}


def _cached(path: Path, compute: Callable[[], dict[str, mx.array]]):
    arrays = None
    if path.is_file():
        try:
            arrays = mx.load(str(path))
        except Exception:  # a damaged cache entry is recomputed, never fatal
            log.warning("ignoring damaged cache entry %s", path)
    if arrays is None:
        arrays = compute()
        mx.eval(arrays)
        temporary = path.with_suffix(".tmp.safetensors")
        mx.save_safetensors(str(temporary), arrays)
        temporary.replace(path)
    if "latents" in arrays:
        return arrays["latents"]
    return EncodedPrompt(hidden=arrays["hidden"], pooled=arrays["pooled"])


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps([ENCODING_VERSION, *map(str, parts)]).encode()).hexdigest()[:24]


class BatchIterator:
    """Epochs of shuffled batches plus the per-step draws (timestep, noise), all
    from one numpy generator; `state()`/`from_state()` make resume bit-exact."""

    def __init__(self, num_examples: int, batch_size: int, num_epochs: int, seed: int):
        self.num_examples = num_examples
        self.batch_size = min(batch_size, num_examples)
        self.num_epochs = num_epochs
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.epoch = 0
        self.position = 0  # index into the current permutation
        self.num_iterations = 0  # optimizer steps done
        self.permutation = self._new_permutation()

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.num_epochs

    @property
    def finished(self) -> bool:
        return self.num_iterations >= self.total_steps

    def _new_permutation(self) -> list[int]:
        return [int(i) for i in self.rng.permutation(self.num_examples)]

    def next_batch(self) -> list[int]:
        if self.position >= self.num_examples:
            self.epoch += 1
            self.position = 0
            self.permutation = self._new_permutation()
        indices = self.permutation[self.position:self.position + self.batch_size]
        self.position += len(indices)
        self.num_iterations += 1
        return indices

    def draw_timesteps(self, batch: int, num_steps: int) -> np.ndarray:
        return self.rng.integers(0, num_steps, size=batch)

    def draw_noise(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32)

    def state(self, start_date_time: str) -> dict:
        return {"position": self.position, "epoch": self.epoch, "num_iterations": self.num_iterations,
                "current_permutation": self.permutation, "rng_state": self.rng.bit_generator.state,
                "batch_size": self.batch_size, "num_epochs": self.num_epochs, "start_date_time": start_date_time,
                "num_examples": self.num_examples}

    @classmethod
    def from_state(cls, state: dict, num_examples: int, seed: int) -> "BatchIterator":
        iterator = cls(num_examples, int(state["batch_size"]), int(state["num_epochs"]), seed)
        iterator.position = int(state["position"])
        iterator.epoch = int(state["epoch"])
        iterator.num_iterations = int(state["num_iterations"])
        iterator.permutation = [int(i) for i in state["current_permutation"]]
        rng_state = state.get("rng_state")
        if isinstance(rng_state, dict) and rng_state.get("bit_generator") == "PCG64":
            iterator.rng.bit_generator.state = rng_state
        else:
            # a checkpoint from mflux keeps Python's random state: continue deterministically, not identically
            log.warning("checkpoint has a foreign random state; resuming with a fresh generator")
            iterator.rng = np.random.Generator(np.random.PCG64([seed, iterator.num_iterations]))
        return iterator
