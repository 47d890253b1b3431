"""Changes to a run that bring its memory estimate under what the machine has.

Each of the guide's fixes (quantize, gradient checkpointing, a lower rank, fewer
blocks, a smaller size) is estimated alone; if none fits alone, one more applies
them in turn until the run fits. The wizard offers them as keys and
`dreambooth-wizard estimate` prints them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from engine.memory import (
    GIB,
    PIXELS_PER_TOKEN_SIDE,
    MemoryEstimate,
    MemoryInputs,
    _block_position,
    estimate_memory,
)


@dataclass
class Fix:
    """One change to the run that lowers its peak; `key` is the wizard's shortcut."""

    key: str
    label: str
    inputs: MemoryInputs
    estimate: MemoryEstimate
    fits: bool

    def to_dict(self) -> dict:
        return {"key": self.key, "label": self.label, "peak": self.estimate.peak,
                "peak_gib": round(self.estimate.peak / GIB, 3), "fits": self.fits}


MINIMUM_SIDE = 256


def suggest_fixes(inputs: MemoryInputs, available_bytes: int) -> list[Fix]:
    """The guide's fixes, in its order, each applied alone to `inputs`: quantize, gradient
    checkpointing, lower rank, fewer blocks, lower resolution. Only fixes that lower the peak are
    listed; if none fits alone, a last fix ("a") applies them in turn until the run fits."""
    base = estimate_memory(inputs).peak
    fixes = []
    for key, label, changed in _candidate_changes(inputs):
        estimate = estimate_memory(changed)
        if estimate.peak < base:
            fixes.append(Fix(key, label, changed, estimate, estimate.fits(available_bytes)))
    if fixes and not any(fix.fits for fix in fixes):
        combined, labels, estimate = inputs, [], None
        for wanted in ("4", "g", "r", "b", "l"):  # each kind once, in order, until it fits
            step = next((step for step in _candidate_changes(combined) if step[0] == wanted), None)
            if step is None:
                continue
            _, label, combined = step
            labels.append(label)
            estimate = estimate_memory(combined)
            if estimate.fits(available_bytes):
                break
        if len(labels) > 1 and estimate is not None and estimate.peak < base:
            fixes.append(Fix("a", "all of: " + "; ".join(labels), combined, estimate, estimate.fits(available_bytes)))
    return fixes


def _candidate_changes(inputs: MemoryInputs) -> list[tuple[str, str, MemoryInputs]]:
    replace = dataclasses.replace
    changes = []
    if inputs.quantize is None:
        changes.append(("8", "quantize the base model to 8 bits", replace(inputs, quantize=8)))
    if inputs.quantize is None or inputs.quantize > 4:
        changes.append(("4", "quantize the base model to 4 bits", replace(inputs, quantize=4)))
    if not inputs.gradient_checkpointing:
        changes.append(("g", "turn on gradient checkpointing (~30% slower)",
                        replace(inputs, gradient_checkpointing=True)))
    ranks = [rank for _, rank in inputs.lora_targets]
    if ranks and max(ranks) > 1:
        halved = tuple((path, max(1, rank // 2)) for path, rank in inputs.lora_targets)
        changes.append(("r", f"halve the LoRA rank ({max(ranks)} -> {max(1, max(ranks) // 2)})",
                        replace(inputs, lora_targets=halved)))
    fewer = _later_half_of_blocks(inputs)
    if fewer is not None:
        kept, total, targets = fewer
        changes.append(("b", f"train only the last {kept} of the {total} blocks",
                        replace(inputs, lora_targets=targets)))
    if max(inputs.width, inputs.height) > MINIMUM_SIDE:
        width, height = _smaller_size(inputs)
        changes.append(("l", f"train at {width}x{height} instead of {inputs.width}x{inputs.height}",
                        replace(inputs, width=width, height=height)))
    return changes


def _later_half_of_blocks(inputs: MemoryInputs):
    """Keep the later half of the trained blocks: activations are stored from the first trained
    block on, so dropping the earliest ones saves most."""
    config = inputs.model.transformer
    num_joint, num_single = config.get("num_layers", 19), config.get("num_single_layers", 38)
    positions = sorted({_block_position(path, num_joint, num_single) for path, _ in inputs.lora_targets})
    if len(positions) < 2:
        return None
    kept = set(positions[len(positions) // 2:])
    targets = tuple((path, rank) for path, rank in inputs.lora_targets
                    if _block_position(path, num_joint, num_single) in kept)
    return len(kept), len(positions), targets


GRID = 64  # sizes are proposed on a 64-pixel grid (as the 3/4 rule always has)
ATTENTION_TILE = 128  # cuDNN's fused attention on CUDA takes sequence lengths in whole tiles of this many tokens
MOST_PIXELS_KEPT = 0.75  # a CUDA size keeps at most this share of the pixels, so the fix clearly lowers the peak
ASPECT_TOLERANCE = 1.25  # and its aspect ratio is within this factor of the current one


def _smaller_size(inputs: MemoryInputs) -> tuple[int, int]:
    """The "train at a smaller size" fix: three quarters of each side, on the 64-pixel grid, no side
    below 256 (aspect ratio roughly kept). On CUDA that size may leave attention's sequence (image
    tokens plus the T5 tokens) off whole 128-token tiles, which sends its backward to MLX's unfused
    fallback that keeps the (heads x L x L) probabilities (engine/memory.py: _attention_backward):
    512x512 (1536 tokens, fused) -> 384x384 (1088, unfused) saves far less than it should. There the
    size is the nearest whole-tile one instead (_whole_tile_size), or the 3/4 rule if none is."""
    if inputs.backend == "cuda":
        size = _whole_tile_size(inputs)
        if size is not None:
            return size
    return _three_quarters(inputs.width), _three_quarters(inputs.height)


def _three_quarters(side: int) -> int:
    return max(MINIMUM_SIDE, min(side, int(side * 0.75) // GRID * GRID))


def _whole_tile_size(inputs: MemoryInputs) -> tuple[int, int] | None:
    """The size on the grid, each side from 256 to the current one, whose sequence is whole 128-token
    tiles, that keeps at most 3/4 of the pixels (a clear saving) and the aspect ratio within 1.25x,
    nearest the 3/4 rule's size: the least largest side ratio (in log scale, so 2x too big and 2x too
    small are as far), ties to the closer aspect ratio, then the larger size. None where none is."""
    width, height = inputs.width, inputs.height
    target_width, target_height = _three_quarters(width), _three_quarters(height)
    aspect = math.log(width / height)

    def tokens(w: int, h: int) -> int:
        return (h // PIXELS_PER_TOKEN_SIDE) * (w // PIXELS_PER_TOKEN_SIDE) + inputs.t5_length

    def rank(size: tuple[int, int]) -> tuple[float, float, int]:
        w, h = size
        distance = max(abs(math.log(w / target_width)), abs(math.log(h / target_height)))
        return round(distance, 9), round(abs(math.log(w / h) - aspect), 9), -w * h

    sizes = [(w, h) for w in range(MINIMUM_SIDE, width + 1, GRID) for h in range(MINIMUM_SIDE, height + 1, GRID)
             if tokens(w, h) % ATTENTION_TILE == 0 and w * h <= MOST_PIXELS_KEPT * width * height
             and abs(math.log(w / h) - aspect) <= math.log(ASPECT_TOLERANCE) + 1e-9]
    return min(sizes, key=rank, default=None)
