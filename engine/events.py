"""What the trainer tells its listeners, and how a listener steers it.

Events are plain dicts (mlx-lm's callback style) with a `type` key, so a UI, a
JSON-lines printer or a test can subscribe without importing the trainer:

  phase       {"phase": "load"|"encode"|"kernels"|"load_transformer"|"compile"|"train", "detail": str}
              (encoders load and run first, the transformer loads, quantized as it loads, after they are freed;
              "kernels": waiting for engine/kernel_warmup.py, on CUDA, on a machine's first run)
  progress    {"phase": str, "done": int, "total": int}           (loading, encoding)
  step        {"step", "total_steps", "epoch", "num_epochs", "loss", "it_per_s", "eta_s", "peak_memory_gib",
               "uncompiled": bool}  (uncompiled: run while this machine's GPU kernels compiled, slower; a second
              "train" phase event says when they are ready)
  preview     {"step", "path"}
  checkpoint  {"step", "path"}
  plot        {"step", "path"}
  paused      {"step"}     resumed {"step"}
  warning     {"message"}
  error       {"message", "hint"}                                  (the run then ends)
  finished    {"step", "adapter_path", "checkpoint_path", "stopped": bool}

Controls are thread-safe: the UI thread calls them, the training thread acts on
them between steps (a thread cannot be killed, so the loop polls every step).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

Event = dict[str, Any]
EventCallback = Callable[[Event], None]


def make_event(kind: str, **fields: Any) -> Event:
    return {"type": kind, "time": time.time(), **fields}


class TrainingControls:
    """Stop, pause/resume, checkpoint now, preview now; safe to call from any thread."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._lock = threading.Lock()
        self._checkpoint_requested = False
        self._preview_requested = False

    def stop(self) -> None:
        """Finish the current step, write a checkpoint, end the run."""
        self._stop.set()
        self._running.set()  # a paused run must wake up to stop

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def toggle_pause(self) -> bool:
        """Pause if running, resume if paused; returns True when now paused."""
        if self.paused:
            self.resume()
            return False
        self.pause()
        return True

    def request_checkpoint(self) -> None:
        with self._lock:
            self._checkpoint_requested = True

    def request_preview(self) -> None:
        with self._lock:
            self._preview_requested = True

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wait_while_paused(self, poll_s: float = 0.2) -> None:
        while not self._running.wait(poll_s):
            pass

    @property
    def wants_attention(self) -> bool:
        """Anything the loop must act on between steps (stop, pause, checkpoint, preview)."""
        with self._lock:
            requested = self._checkpoint_requested or self._preview_requested
        return requested or self.stop_requested or self.paused

    def take_checkpoint_request(self) -> bool:
        with self._lock:
            requested, self._checkpoint_requested = self._checkpoint_requested, False
            return requested

    def take_preview_request(self) -> bool:
        with self._lock:
            requested, self._preview_requested = self._preview_requested, False
            return requested
