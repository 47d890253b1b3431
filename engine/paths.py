"""Where the engine keeps its own files: the tiny model, encoding caches.

`DREAMBOOTH_WIZARD_HOME` overrides the platform folders (tests use it so they
never touch the user's home).
"""
from __future__ import annotations

import os
from pathlib import Path


def _home() -> Path | None:
    value = os.environ.get("DREAMBOOTH_WIZARD_HOME")
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    home = _home()
    if home:
        path = home / "cache"
    else:
        import platformdirs

        path = Path(platformdirs.user_cache_dir("dreambooth-wizard"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_dir() -> Path:
    home = _home()
    if home:
        path = home / "logs"
    else:
        import platformdirs

        path = Path(platformdirs.user_log_dir("dreambooth-wizard"))
    path.mkdir(parents=True, exist_ok=True)
    return path
