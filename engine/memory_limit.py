"""The memory cap of a training step on CUDA: MLX's soft limit, set from the estimate
(engine/memory.py) for the runs where holding the step back pays."""
from __future__ import annotations

from engine.memory import MemoryEstimate, estimate_memory, inputs_from_config


def graph_memory_limit(estimate: MemoryEstimate) -> int:
    """A soft memory limit for the training step: the estimated training peak (on CUDA it includes
    the run-ahead allowance, so the estimate is what the run will use).

    MLX's limit is soft: past it the allocator frees its cache and stops the
    graph from running far ahead of the GPU. On CUDA the default (95% of the
    card) lets a step queue temporaries of many blocks at once; bench/NOTES.md
    shows the peak this saves.
    """
    return estimate.training_peak


def limits_graph_memory(cfg, model_config, backend: str, available_bytes: int | None = None) -> bool:
    """Whether the trainer caps the step's memory: on CUDA, for runs without checkpointing whose
    uncapped estimate would not fit `available_bytes` (None: unknown) while capping helps (quantized
    runs: their queued work holds dense copies of dequantized weights; engine/memory.py).

    The cap holds the step back whenever it binds: 4-bit style took 0.219 s at 22.7 GiB capped,
    0.159 s at 30.9 GiB uncapped (H100, run 12), and bf16 gains nothing from it (style 42.2 GiB
    capped or not). Checkpointed runs were always capped while they were one graph (people 4-bit:
    17.8 GiB uncapped, 10.5 capped); the block-by-block step (engine/blockwise_step.py) bounds its
    own queue: 8.67 GiB uncapped at 0.157 s, where MLX's cap at 7.6 GiB on top of it held 8.52 GiB
    at 0.204 s (H200, run 13), so they go uncapped.
    """
    if backend != "cuda":
        return False
    return graph_memory_estimate(cfg, model_config, backend, available_bytes).details["graph_memory_capped"]


def graph_memory_estimate(cfg, model_config, backend: str, available_bytes: int | None = None) -> MemoryEstimate:
    """The estimate for training `cfg` with the cap decided as the trainer decides it."""
    return estimate_memory(inputs_from_config(cfg, model_config, backend=backend, available_bytes=available_bytes))


def blockwise_depth(cfg, model_config, backend: str, available_bytes: int | None = None) -> int | None:
    """The depth the block-by-block step runs `cfg` at (engine/memory_cuda.py: blockwise_depth_to_fit):
    on CUDA, 0 where the default depth would not fit `available_bytes`; None: the engine's default."""
    if backend != "cuda" or available_bytes is None:
        return None
    return graph_memory_estimate(cfg, model_config, backend, available_bytes).details.get("blockwise_depth")


def apply_graph_memory_limit(cfg, model_config, backend: str, available_bytes: int | None = None) -> int | None:
    """Set MLX's memory limit from the estimate for `cfg` where `limits_graph_memory`; returns it (else None)."""
    if backend != "cuda":
        return None
    estimate = graph_memory_estimate(cfg, model_config, backend, available_bytes)
    if not estimate.details["graph_memory_capped"]:
        return None
    import mlx.core as mx

    limit = graph_memory_limit(estimate)
    mx.set_memory_limit(limit)
    return limit
