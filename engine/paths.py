"""Where the engine keeps its own files: the tiny model, encoding caches, logs.

`DREAMBOOTH_WIZARD_HOME` overrides the platform folders (tests use it so they
never touch the user's home).
"""
from __future__ import annotations

import os
from pathlib import Path


def _folder(kind: str) -> Path:
    home = os.environ.get("DREAMBOOTH_WIZARD_HOME")
    if home:
        path = Path(home).expanduser() / kind
    else:
        import platformdirs

        find = {"cache": platformdirs.user_cache_dir, "logs": platformdirs.user_log_dir}[kind]
        path = Path(find("dreambooth-wizard"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    return _folder("cache")


def log_dir() -> Path:
    return _folder("logs")


def unwritable_reason(folder: Path) -> str | None:
    """Why `folder` cannot be written to (it is created if missing, then probed), or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".dreambooth-wizard-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        return error.strerror or str(error)
    return None
