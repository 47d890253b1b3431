"""Errors a user can cause. Each carries one message that says what to do.

The CLI prints `str(error)` once and exits with `exit_code`; no traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: bad config, missing file, no access, ..."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n  -> {hint}")


class ConfigError(UserError):
    """The training config has problems; `problems` lists each one."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class ModelLoadError(UserError):
    """Weights or configs that cannot be found, read or matched."""


class ModelAccessError(UserError):
    """A gated or private Hugging Face repo without access, or no network."""


class ImageError(UserError):
    """An image that cannot be used for training."""


class CheckpointError(UserError):
    """A checkpoint zip that is broken, unsafe or for another model."""


class LoraFormatError(UserError):
    """A LoRA file that does not fit this model."""


class OutputError(UserError):
    """An output folder that cannot be written (permissions, full disk)."""
