"""All the wizard's MLX work runs on one long-lived thread.

MLX (0.32, Linux CPU) can abort the whole process at exit ("terminate called
without an active exception") when a thread that ran MLX operations ends
before the process does (ml-explore/mlx#3126). Textual's thread workers run in
a pool whose threads end at shutdown, so a worker hands its MLX work to this
thread and waits for it: this thread never ends (a daemon parked on its queue),
and the process exits cleanly.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

Result = TypeVar("Result")

_jobs: queue.Queue = queue.Queue()
_thread: threading.Thread | None = None
_lock = threading.Lock()


def run_on_mlx_thread(function: Callable[[], Result]) -> Result:
    """Run `function` on the MLX thread; blocks the calling thread until it returns (or raises)."""
    _ensure_thread()
    future: Future = Future()
    _jobs.put((function, future))
    return future.result()


def _ensure_thread() -> None:
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_serve, name="mlx", daemon=True)
            _thread.start()


def _serve() -> None:
    while True:
        function, future = _jobs.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(function())
        except BaseException as error:  # handed to the waiting worker, which reports it
            future.set_exception(error)
