"""The CUDA part of the memory estimate (engine/memory.py): what MLX's queued work holds on top of
a training step's settled memory, and whether the trainer caps it (engine/memory_limit.py).

On CUDA the host queues work ahead of the GPU and MLX keeps every queued op's buffers until the
GPU has run it, so a run holds more than what is alive at any one point of the step. How much
was measured on full-size FLUX.1 (bench/RESULTS.md); the coefficients are in CALIBRATION.
"""
from __future__ import annotations

import re

from engine.config import trains_joint_blocks
from engine.memory_calibration import CALIBRATION
from engine.model_size import linear_bytes

# what the wizard and `dreambooth-wizard estimate` say of a run capped, or run one block at a time,
# only to fit (details["held_back_to_fit"])
HELD_BACK_NOTE = ("To fit, training is held to this estimate: steps run slower (10-70% for a 4-bit model) "
                  "than on a GPU with room to spare.")


def cuda_run_ahead(inputs, linears: dict[str, tuple[int, int]], settled: int,
                   hidden_tensor_bytes: int) -> tuple[int, bool, int | None]:
    """(bytes the queued work holds beyond `settled`, whether the trainer caps the run, the
    block-by-block step's depth or None where the run does not take that step) for `inputs`
    (engine.memory.MemoryInputs) with the transformer's `linears`; `hidden_tensor_bytes` is one
    (tokens x hidden) tensor of the step."""
    bits, dtype = inputs.quantize, inputs.dtype_bytes
    if inputs.gradient_checkpointing:
        # the block-by-block step (engine/blockwise_step.py) bounds its own queue: its depth plus the
        # stage the GPU runs, each holding every buffer it allocates until the GPU is done with it
        stage = CALIBRATION["blockwise_stage_tensors"] * hidden_tensor_bytes
        if bits:
            stage += CALIBRATION["blockwise_stage_dense_share"] * largest_block_dense_bytes(linears, dtype)
        depth = blockwise_depth_to_fit(inputs, settled, int(stage))
        return int(stages_in_flight(depth) * stage), False, depth
    # one graph a step: capped runs (memory_limit.py) are capped this much above the rest
    # (graph_memory_limit) and reach the cap; the others were measured (run 9)
    run_ahead = settled * CALIBRATION["cuda_run_ahead_fraction"] + CALIBRATION["cuda_run_ahead_bytes"]
    dequantized = 0  # uncapped quantized runs also hold dense copies of the weights queued work dequantized
    if bits:
        dense = sum(linear_bytes(i, o, None, dtype) for i, o in linears.values())
        crosses_joint = trains_joint_blocks(path for path, _ in inputs.lora_targets)
        share = CALIBRATION["cuda_uncapped_dequantized_fraction" + ("_8bit" if bits == 8 else "")]
        dequantized = dense * share * (CALIBRATION["cuda_uncapped_dequantized_joint_factor"] if crosses_joint else 1)
    capped = _capped_to_fit(inputs, settled + run_ahead + dequantized, saved_by_cap=dequantized)
    return int(run_ahead if capped else run_ahead + dequantized), capped, None


def blockwise_depth_to_fit(inputs, settled: int, stage: int) -> int:
    """The block-by-block step's depth for `inputs`: CUDA's (speed.blockwise_depth), or 0 (one stage at a
    time, each stage's buffers alone) where that depth's peak would not fit `available_bytes`.
    People over a 4-bit base, checkpointed, at 512 on an H200: 8.67 GiB at 0.146-0.152 s with depth 1
    (runs 13, 15), 7.63 GiB at 0.171-0.198 s with 0 and 5 kernels a CUDA graph (run 15; 7.94 GiB at
    0.213 s with MLX's 20); pets and style were 1.4-1.7x slower at 0 with 20 a graph (bench/NOTES.md
    items 31, 33), so only a run that needs it goes one stage at a time."""
    depth = blockwise_default_depth()
    if depth and inputs.available_bytes is not None and settled + stages_in_flight(depth) * stage > inputs.available_bytes:
        return 0
    return depth


def stages_in_flight(depth: int) -> float:
    """How many stages' buffers the block-by-block step holds at once at `depth`: those queued and the one
    running; without a bound by stages (-1), what MLX's own bound on CUDA graphs in flight amounts to."""
    return CALIBRATION["blockwise_unbounded_stages"] if depth < 0 else depth + 1


def cuda_preview_run_ahead(inputs, linears: dict[str, tuple[int, int]], hidden_tensor_bytes: int) -> int:
    """A preview's transformer call, queued block by block (engine/flux/bounded_queue.py): the blocks
    in flight, each holding its temporaries and, over a quantized base, its layers' dense copies."""
    from engine.flux import speed

    block = CALIBRATION["preview_stage_tensors"] * hidden_tensor_bytes
    if inputs.quantize:
        block += largest_block_dense_bytes(linears, inputs.dtype_bytes)
    return int((speed.INFERENCE_DEPTH + 1) * block)


def _capped_to_fit(inputs, uncapped_training_peak: float, saved_by_cap: float) -> bool:
    """Whether the trainer caps the step's memory at the estimate (engine/memory_limit.py): runs
    without checkpointing that the cap makes smaller (quantized: it saves the dense copies their
    queued work holds) and that would not fit `available_bytes` uncapped. The cap costs speed
    (bench/NOTES.md), so a run that fits, or that the cap would not shrink, goes without.
    Checkpointed runs take the block-by-block step, which bounds its own queue."""
    return saved_by_cap > 0 and inputs.available_bytes is not None and uncapped_training_peak > inputs.available_bytes


def blockwise_default_depth() -> int:
    from engine.flux import speed

    return speed.blockwise_depth(cuda=True)


def largest_block_dense_bytes(linears: dict[str, tuple[int, int]], dtype_bytes: int) -> int:
    """The dense copy of one block's dequantized linears (modulations excluded: their one row takes
    the quantized matmul, engine/flux/quantized.py), for the largest block."""
    blocks: dict[str, int] = {}
    for path, (i, o) in linears.items():
        match = re.match(r"^((?:single_)?transformer_blocks\.\d+)\.(.+)$", path)
        if match and not match.group(2).startswith("norm"):
            blocks[match.group(1)] = blocks.get(match.group(1), 0) + linear_bytes(i, o, None, dtype_bytes)
    return max(blocks.values(), default=0)
