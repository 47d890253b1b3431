"""Crop boxes: the region of a photo that becomes a training image, always of the training
aspect and inside the photo (engine/images.py crops and resizes with them; the wizard's crop
editor moves and scales them)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CropBox:
    """A region of the photo in its own pixels (after EXIF rotation)."""

    left: int
    top: int
    width: int
    height: int

    @property
    def right(self) -> int:
        return self.left + self.width

    @property
    def bottom(self) -> int:
        return self.top + self.height

    def as_tuple(self) -> tuple[int, int, int, int]:
        """(left, top, width, height), as the wizard state stores it."""
        return self.left, self.top, self.width, self.height

    def __iter__(self):
        return iter(self.as_tuple())

    @classmethod
    def of(cls, box: "CropBox | tuple[int, int, int, int]") -> "CropBox":
        """A CropBox from itself or from a (left, top, width, height) tuple."""
        return box if isinstance(box, cls) else cls(*(int(v) for v in box))


def default_crop(image_size: tuple[int, int], target_width: int, target_height: int) -> CropBox:
    """The largest centred box with the training aspect."""
    image_width, image_height = image_size
    scale = min(image_width / target_width, image_height / target_height)
    return _box_around(image_width / 2, image_height / 2, target_width * scale, image_size, target_width, target_height)


def _box_around(centre_x: float, centre_y: float, width: float, image_size: tuple[int, int],
                target_width: int, target_height: int) -> CropBox:
    """A box of the target aspect near a centre, as wide as asked but inside the image."""
    image_width, image_height = image_size
    width = min(width, image_width, image_height * target_width / target_height)
    width = max(1, round(width))
    height = max(1, min(image_height, round(width * target_height / target_width)))
    left = round(min(max(centre_x - width / 2, 0), image_width - width))
    top = round(min(max(centre_y - height / 2, 0), image_height - height))
    return CropBox(left, top, width, height)


def move_crop(box: CropBox, dx: int, dy: int, image_size: tuple[int, int]) -> CropBox:
    """The box shifted by (dx, dy), stopped at the image's edges."""
    image_width, image_height = image_size
    left = min(max(box.left + dx, 0), image_width - box.width)
    top = min(max(box.top + dy, 0), image_height - box.height)
    return CropBox(left, top, box.width, box.height)


def scale_crop(box: CropBox, factor: float, image_size: tuple[int, int], target_width: int, target_height: int,
               min_side: int = 64) -> CropBox:
    """The box grown (factor > 1) or shrunk about its centre, aspect kept, inside the image."""
    smallest = min_side * max(1.0, target_width / target_height)  # the shorter side stays >= min_side
    width = max(box.width * factor, min(smallest, box.width))
    return _box_around(box.left + box.width / 2, box.top + box.height / 2, width, image_size,
                       target_width, target_height)


def fit_crop(box: CropBox, image_size: tuple[int, int], target_width: int, target_height: int) -> CropBox:
    """The box reshaped to a new training aspect around the same centre, about as large."""
    area = box.width * box.height
    width = (area * target_width / target_height) ** 0.5
    return _box_around(box.left + box.width / 2, box.top + box.height / 2, width, image_size,
                       target_width, target_height)


def check_crop(box: CropBox | tuple[int, int, int, int], image_size: tuple[int, int], target_width: int, target_height: int) -> None:
    """Raises ValueError unless the box lies inside the image with the target aspect (to one pixel)."""
    box = CropBox.of(box)
    image_width, image_height = image_size
    if box.width < 1 or box.height < 1 or box.left < 0 or box.top < 0 \
            or box.right > image_width or box.bottom > image_height:
        raise ValueError(f"crop {list(box.as_tuple())} (left, top, width, height) does not lie inside the "
                         f"{image_width}x{image_height} image")
    # a rounding pixel is allowed; anything more would stretch the photo
    if abs(box.width * target_height - box.height * target_width) > max(target_width, target_height):
        raise ValueError(f"crop {box.width}x{box.height} does not have the {target_width}x{target_height} aspect; "
                         "use default_crop or fit_crop to make one")
