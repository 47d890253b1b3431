"""A keyboard file browser that lists folders and image files only."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from textual.widgets import DirectoryTree

from engine.images import IMAGE_SUFFIXES


class ImageTree(DirectoryTree):
    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        for path in paths:
            if path.name.startswith("."):
                continue
            try:
                if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
                    yield path
            except OSError:  # a broken link or a folder we may not read: leave it out
                continue
