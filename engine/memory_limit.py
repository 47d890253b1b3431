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


def limits_graph_memory(cfg, backend: str) -> bool:
    """Whether the trainer caps the step's memory: on CUDA, for runs with gradient checkpointing.

    The cap holds the step back whenever it binds: it cost 10% (bf16) to 25% (4-bit
    with checkpointing) of the step time on an H200 (bench/NOTES.md). Without
    checkpointing the stored activations dominate and the cap saved little (bf16
    pets: 38.9 -> 40.7 GiB), so only runs that asked to save memory pay for it.
    Runs through joint blocks were capped too while their attention backward
    recomputed the softmax; on the contiguous route (engine/flux/speed.py) bf16
    style peaked at 42.2 GiB capped or not, and took 0.133 s capped, 0.118 s not
    (H100, run 12).
    """
    return backend == "cuda" and bool(cfg.gradient_checkpointing)


def apply_graph_memory_limit(cfg, model_config: dict, backend: str) -> int | None:
    """Set MLX's memory limit from the estimate for `cfg` where `limits_graph_memory`; returns it (else None)."""
    if not limits_graph_memory(cfg, backend):
        return None
    import mlx.core as mx

    estimate = estimate_memory(inputs_from_config(cfg, model_config, backend=backend))
    limit = graph_memory_limit(estimate)
    mx.set_memory_limit(limit)
    return limit
