"""Running MLX code with its compile off, where compiling costs more than it saves.

A compiled function's fused kernels are compiled the first time a process meets them (NVRTC on CUDA, a C++
compiler on the CPU backend), seconds each, and on CUDA kept on disk for later runs. With compile off the
same function runs as the plain function it wraps, on MLX's own unfused kernels, which ship compiled in its
library: the same numbers, more kernels, nothing to compile. So:

- the encoders (T5, CLIP, the VAE's encoder), which a run calls once per prompt or image: their fused
  activations saved microseconds and cost ~17 s of compiling on a machine's first CUDA run (bench/NOTES.md
  item 56);
- a training step queued while other processes still compile the compiled step's kernels
  (engine/training_step.py: make_uncompiled_step).

MLX's switch is global. Nested and concurrent uses are counted, so compile comes back on when the last one
ends; a process started with MLX_DISABLE_COMPILE keeps it off.
"""
from __future__ import annotations

import functools
import os
import threading
from contextlib import contextmanager

import mlx.core as mx

_lock = threading.Lock()
_users = [0]


@contextmanager
def compile_switched_off():
    """MLX's compile off for what runs inside (module docstring)."""
    if os.environ.get("MLX_DISABLE_COMPILE"):
        yield
        return
    with _lock:
        _users[0] += 1
        if _users[0] == 1:
            mx.disable_compile()
    try:
        yield
    finally:
        with _lock:
            _users[0] -= 1
            if _users[0] == 0:
                mx.enable_compile()


def compile_is_off() -> bool:
    """Inside `compile_switched_off` (in any thread)."""
    return _users[0] > 0


def uncompiled(function):
    """`function` run inside `compile_switched_off`."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with compile_switched_off():
            return function(*args, **kwargs)

    return wrapper
