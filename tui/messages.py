"""Messages that carry work done in thread workers to the screens.

A worker thread calls `post_message`, which only queues: the training loop
never waits for the UI (`call_from_thread` would block it until the screen
caught up). Messages that arrive faster than the screen draws - loss steps,
download bytes - replace their pending predecessor (`can_replace`, as toolong
does), so a slow terminal skips frames instead of falling behind. They carry
whatever the screen needs in full (the whole loss history, bytes so far), so a
skipped message loses nothing.
"""
from __future__ import annotations

from pathlib import Path

from textual.message import Message


class EngineEvent(Message):
    """One trainer event (a dict from engine/events.py), delivered on the UI thread."""

    def __init__(self, event: dict) -> None:
        self.event = event
        super().__init__()


class TrainingPhase(EngineEvent):
    """load, quantize, encode, compile, train."""


class TrainingProgress(EngineEvent):
    """Progress within a phase (loading, encoding)."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, TrainingProgress) and message.event.get("phase") == self.event.get("phase")


class TrainingStep(EngineEvent):
    """One optimizer step; `losses` is the whole history so far as (step, loss)."""

    def __init__(self, event: dict, losses: tuple[tuple[int, float], ...]) -> None:
        self.losses = losses
        super().__init__(event)

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, TrainingStep)


class PreviewSaved(EngineEvent):
    """A validation image was written."""


class CheckpointSaved(EngineEvent):
    """A checkpoint zip was written."""


class PlotSaved(EngineEvent):
    """A loss plot was written."""


class TrainingPaused(EngineEvent):
    pass


class TrainingResumed(EngineEvent):
    pass


class TrainingWarning(EngineEvent):
    pass


class TrainingError(EngineEvent):
    """The engine reported an error; the run ends."""


class TrainingFinished(EngineEvent):
    """The run ended (finished its steps or stopped on request)."""


EVENT_MESSAGES: dict[str, type[EngineEvent]] = {
    "phase": TrainingPhase,
    "progress": TrainingProgress,
    "preview": PreviewSaved,
    "checkpoint": CheckpointSaved,
    "plot": PlotSaved,
    "paused": TrainingPaused,
    "resumed": TrainingResumed,
    "warning": TrainingWarning,
    "error": TrainingError,
    "finished": TrainingFinished,
}


class EventRelay:
    """The trainer's callback: turns each event into a message posted to `target`.

    Runs on the training thread; it keeps the loss history so that step
    messages can collapse without losing points of the plot.
    """

    def __init__(self, target, losses: list[tuple[int, float]] | None = None) -> None:
        self.target = target
        self.losses: list[tuple[int, float]] = list(losses or [])

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "step":
            self.losses.append((int(event["step"]), float(event["loss"])))
            self.target.post_message(TrainingStep(event, tuple(self.losses)))
            return
        message_class = EVENT_MESSAGES.get(kind)
        if message_class is not None:
            self.target.post_message(message_class(event))


class AccessChecked(Message):
    """engine.flux.hub.check_access answered: cached, ok, gated, missing or offline."""

    def __init__(self, repo_id: str, status: str) -> None:
        self.repo_id = repo_id
        self.status = status
        super().__init__()


class LoginFailed(Message):
    """huggingface_hub refused the token."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__()


class DownloadProgress(Message):
    """Bytes of the model downloaded so far (total None while unknown)."""

    def __init__(self, done: int, total: int | None) -> None:
        self.done = done
        self.total = total
        super().__init__()

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, DownloadProgress)


class DownloadFinished(Message):
    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__()
