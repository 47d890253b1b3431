"""What the wizard has learned so far, shared by its screens.

Screens read and write this object (`app.state`); the Review screen turns it
into an mflux training config, which is the only thing the trainer sees.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ImageChoice:
    path: Path
    prompt: str = ""
    trigger: str = "sks"
    crop: tuple[int, int, int, int] | None = None  # left, top, width, height in original pixels
    status: str = "ok"  # ok | warning | rejected (from engine.images.check_image)
    reasons: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None  # width, height as displayed (EXIF rotation applied); None until checked


@dataclass
class WizardState:
    model: str = "dev"
    images: list[ImageChoice] = field(default_factory=list)
    trigger: str = "sks"
    class_noun: str = "dog"
    template: str = "pets"
    config: dict = field(default_factory=dict)  # the mflux JSON being edited
    config_path: Path | None = None  # where Review saved it
    output_dir: Path | None = None
    resume_checkpoint: Path | None = None
    demo: bool = False

    @property
    def usable_images(self) -> list[ImageChoice]:
        return [image for image in self.images if image.status != "rejected"]
