"""A memory fix (engine.memory_fixes.Fix, which changes MemoryInputs) carried back into the mflux config."""
from __future__ import annotations

import re

PATTERN = re.compile(r"^(?:transformer\.)?(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def blocks_and_ranks(targets) -> dict[str, tuple[list[int], int]]:
    """{'single_transformer_blocks': ([0, 1, ...], rank), ...} from (module path, rank) pairs."""
    found: dict[str, tuple[set[int], int]] = {}
    for path, rank in targets:
        match = PATTERN.match(path)
        if match is None:
            continue
        blocks, top = found.get(match.group(1), (set(), 0))
        blocks.add(int(match.group(2)))
        found[match.group(1)] = (blocks, max(top, rank))
    return {kind: (sorted(blocks), rank) for kind, (blocks, rank) in found.items()}


def block_range_dict(blocks: list[int]) -> dict:
    if blocks == list(range(blocks[0], blocks[-1] + 1)):
        return {"start": blocks[0], "end": blocks[-1] + 1}
    return {"indices": blocks}


def apply_fix(config: dict, before, after) -> dict:
    """`config` (mflux JSON) changed as `after` differs from `before` (both engine.memory.MemoryInputs)."""
    data = {key: (dict(value) if isinstance(value, dict) else value) for key, value in config.items()}
    if after.quantize != before.quantize:
        data["quantize"] = after.quantize
    if after.gradient_checkpointing != before.gradient_checkpointing:
        data["gradient_checkpointing"] = after.gradient_checkpointing
    if (after.width, after.height) != (before.width, before.height):
        data["width"], data["height"] = after.width, after.height
    if after.batch_size != before.batch_size:
        data["training_loop"] = dict(data["training_loop"], batch_size=after.batch_size)
    if after.lora_targets != before.lora_targets:
        layers = {}
        kept = blocks_and_ranks(after.lora_targets)
        for kind, spec in data.get("lora_layers", {}).items():
            if kind not in kept:
                continue  # every block of this kind was dropped
            blocks, rank = kept[kind]
            layers[kind] = dict(spec, block_range=block_range_dict(blocks), lora_rank=rank)
        data["lora_layers"] = layers
    return data
