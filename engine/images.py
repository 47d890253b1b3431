"""The user's photos: open, orient, check, crop and resize (Pillow and numpy only).

mflux resizes every photo straight to the training size, stretching anything
that is not already that shape. Here a photo is first cropped to the training
aspect (a centred box by default, movable in the wizard), then resized, so
faces and pets keep their proportions.

`check_image` answers the wizard's questions about one photo (readable? big
enough? sharp? rotated?) and `check_images` adds near-duplicate detection over
the whole set. Every failure a user can cause becomes an `ImageError` that says
what to do.
"""
from __future__ import annotations

import hashlib
import io
import logging
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.crops import CropBox, check_crop
from engine.errors import ImageError

logger = logging.getLogger(__name__)

MIN_SIDE_REJECTED = 256  # below this FLUX.1 has almost nothing to learn from
MIN_SIDE_WARNING = 512  # the usual training size
MAX_ASPECT_RATIO = 2.5  # wider than this, a square crop keeps less than 40% of the photo
BLUR_THRESHOLD = 50.0  # see blur_score; a heuristic: sharp photos score in the hundreds, a 2-pixel blur ~30
ANALYSIS_SIDE = 512  # blur and hash are measured on a copy this size, so scores compare across photos
DUPLICATE_DISTANCE = 8  # of the 64 hash bits; resized or re-encoded copies differ by a few
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif", ".avif")
_HEIF_SUFFIXES = (".heic", ".heif")
_ORIENTATION_TAG = 0x0112
_SEVERITY = {"ok": 0, "warning": 1, "rejected": 2}


# ---------------------------------------------------------------- opening

def open_image(path: str | Path, max_side: int | None = None) -> Image.Image:
    """The photo as RGB, the way it is meant to be seen (EXIF rotation applied).

    max_side shrinks it to fit a square of that size (JPEGs decode at reduced
    scale, so thumbnails of 12 MP photos are quick).
    """
    return _load(Path(path), max_side)[0]


def _load(path: Path, max_side: int | None) -> tuple[Image.Image, tuple[int, int], bool]:
    """(RGB image, full size as displayed, whether EXIF rotated it)."""
    _check_file(path)
    try:
        # a DecompressionBombWarning (more pixels than Pillow's limit) is an error here:
        # such a photo would take gigabytes to decode and is never a sensible training image
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                orientation = image.getexif().get(_ORIENTATION_TAG, 1)
                width, height = image.size
                if orientation in (5, 6, 7, 8):
                    width, height = height, width
                if max_side:
                    image.draft(None, (max_side, max_side))
                image.load()
                oriented = _apply_orientation(image, path)
                rgb = to_rgb(oriented)
    except Exception as error:
        raise _open_failure(path, error) from None
    if max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return rgb, (width, height), orientation not in (None, 1)


def displayed_size(path: str | Path) -> tuple[int, int]:
    """The photo's (width, height) as displayed (EXIF rotation applied), from its header alone: quick enough
    to check every crop of a config before anything loads."""
    path = Path(path)
    _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # opening it for training says so
            with Image.open(path) as image:
                width, height = image.size
                if image.getexif().get(_ORIENTATION_TAG, 1) in (5, 6, 7, 8):
                    width, height = height, width
    except Exception as error:
        raise _open_failure(path, error) from None
    return width, height


def _open_failure(path: Path, error: Exception) -> Exception:
    """The one message for a photo Pillow could not open or decode; an error that is ours passes unchanged."""
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return _too_large(path)
    if isinstance(error, UnidentifiedImageError):
        return _unsupported(path)
    if isinstance(error, PermissionError):
        return _not_permitted(path)
    if isinstance(error, (OSError, SyntaxError, ValueError, EOFError, IndexError)):
        return _damaged(path, error)
    return error


def _too_large(path: Path) -> ImageError:
    return ImageError(f"{path.name} is too large to open safely (more than {Image.MAX_IMAGE_PIXELS:,} pixels)",
                      "downscale it below 50 megapixels first; training uses 512-1024 pixels anyway")


def _damaged(path: Path, error: Exception) -> ImageError:
    return ImageError(f"{path.name} is damaged or incomplete ({error})",
                      "open it in an image viewer and save it again, or copy it again from the camera")


def _not_permitted(path: Path) -> ImageError:
    return ImageError(f"{path.name} cannot be read: no permission to read {path}",
                      f"fix the file's permissions: its owner can run chmod a+r {shlex.quote(str(path))}")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageError(f"{path} not found", "check the file name and folder")
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image", "choose the image files inside it")
    if path.stat().st_size == 0:
        raise ImageError(f"{path.name} is empty (0 bytes)", "copy the photo again")
    if path.suffix.lower() in _HEIF_SUFFIXES:
        _register_heif()


def _register_heif() -> None:
    try:
        import pillow_heif  # optional: iPhone photos
    except ImportError:
        return
    pillow_heif.register_heif_opener()


def _unsupported(path: Path) -> ImageError:
    if path.suffix.lower() in _HEIF_SUFFIXES:
        return ImageError(f"{path.name} is a HEIC photo, which needs pillow-heif",
                          "export it as JPEG (Photos: File > Export), or pip install pillow-heif")
    return ImageError(f"{path.name} is not an image this program can read",
                      "use JPEG, PNG, WebP, TIFF or BMP files")


def _apply_orientation(image: Image.Image, path: Path) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # a broken EXIF block should not cost the photo
        logger.warning("%s: EXIF orientation ignored (%s)", path.name, error)
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit sRGB: transparency on white, 16-bit scaled, colour profiles applied."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(image)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in ("RGB", "CMYK", "L") and image.info.get("icc_profile"):
        converted = _to_srgb(image)
        if converted is not None:
            return converted
    return image if mode == "RGB" else image.convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "F":
        top = 1.0 if values.size and values.max() <= 1.0 else 255.0
    else:  # "I": 16-bit PNGs arrive this way; 8-bit data stays as it is
        peak = values.max() if values.size else 0
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else float(peak)
    gray = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _to_srgb(image: Image.Image) -> Image.Image | None:
    """Phones shoot in Display P3 and print files come as CMYK: map them to the sRGB the model saw."""
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception as error:  # a broken or unusual profile: plain conversion is still usable
        logger.debug("colour profile not applied: %s", error)
        return None


def content_hash(path: str | Path) -> str:
    """sha256 of the file's bytes: the key of the encoding cache."""
    path = Path(path)
    _check_file(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except PermissionError:
        raise _not_permitted(path) from None
    return digest.hexdigest()


def find_images(folder: str | Path) -> list[Path]:
    """The image files directly inside a folder, sorted by name."""
    return sorted(p for p in Path(folder).expanduser().iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


# ---------------------------------------------------------------- cropping

def crop_and_resize(image: Image.Image, box: CropBox | tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """The box's pixels at width x height, float32 (H, W, 3) in [-1, 1]; never stretches."""
    box = CropBox.of(box)
    check_crop(box, image.size, width, height)
    image = to_rgb(image)
    # crop first: resize(box=...) would let the filter read pixels just outside the box
    resized = image.crop((box.left, box.top, box.right, box.bottom)).resize(
        (width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------- checking

@dataclass
class ImageReport:
    path: Path
    status: str = "ok"  # ok | warning | rejected
    reasons: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None  # as displayed (after EXIF rotation)
    blur_score: float | None = None  # variance of the Laplacian; higher is sharper
    perceptual_hash: str | None = None  # 64-bit DCT hash, hex
    was_rotated: bool = False  # EXIF said the camera was turned

    def flag(self, status: str, reason: str) -> None:
        if _SEVERITY[status] > _SEVERITY[self.status]:
            self.status = status
        self.reasons.append(reason)


def check_image(path: str | Path) -> ImageReport:
    """Whether one photo suits training, and why not."""
    report = ImageReport(Path(path))
    try:
        image, report.size, report.was_rotated = _load(report.path, ANALYSIS_SIDE)
    except ImageError as error:
        report.flag("rejected", str(error))
        return report
    width, height = report.size
    shorter = min(width, height)
    if shorter < MIN_SIDE_REJECTED:
        report.flag("rejected", f"only {width}x{height} pixels; use photos at least {MIN_SIDE_WARNING} pixels on the "
                                f"shorter side ({MIN_SIDE_REJECTED} at the very least)")
    elif shorter < MIN_SIDE_WARNING:
        report.flag("warning", f"{width}x{height} is small; {MIN_SIDE_WARNING} pixels or more on the shorter side "
                               "gives sharper results")
    if max(width, height) / shorter > MAX_ASPECT_RATIO:
        report.flag("warning", f"very elongated ({width}x{height}); the crop will keep only part of it")
    report.blur_score = blur_score(image)
    if report.blur_score < BLUR_THRESHOLD:
        report.flag("warning", f"looks blurry (sharpness {report.blur_score:.0f}, below {BLUR_THRESHOLD:.0f}); "
                               "the model learns the blur too")
    report.perceptual_hash = perceptual_hash(image)
    return report


def check_images(paths: list[str | Path]) -> list[ImageReport]:
    """check_image for each photo, plus a warning on each near-duplicate of an earlier one."""
    reports = [check_image(path) for path in paths]
    for i, report in enumerate(reports):
        if report.perceptual_hash is None:
            continue
        for earlier in reports[:i]:
            if earlier.perceptual_hash is not None and earlier.status != "rejected" \
                    and hash_distance(report.perceptual_hash, earlier.perceptual_hash) <= DUPLICATE_DISTANCE:
                report.flag("warning", f"nearly the same as {earlier.path.name}; keep the better one "
                                       "(copies make the model memorise that one shot)")
                break
    return reports


def count_advice(count: int) -> str:
    """One line about how many photos there are."""
    if count == 0:
        return "No photos yet: add 5-20 photos of your subject (10-20 is ideal)."
    if count < 5:
        return f"{count} photo(s): add at least {5 - count} more; 5-20 work, 10-20 is ideal."
    if count < 10:
        return f"{count} photos: enough to start; 10-20 varied photos give the best results."
    if count <= 20:
        return f"{count} photos: ideal."
    if count <= 30:
        return f"{count} photos: more than needed; each epoch takes longer. Keep the 20 most varied if you like."
    return f"{count} photos: more than 30 rarely helps a subject; keep the 20 sharpest and most varied."


def _analysis_gray(image: Image.Image) -> np.ndarray:
    if max(image.size) > ANALYSIS_SIDE:
        image = image.copy()
        image.thumbnail((ANALYSIS_SIDE, ANALYSIS_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(image.convert("L"), dtype=np.float64)


def blur_score(image: Image.Image) -> float:
    """Sharpness: variance of the Laplacian of the grayscale image at ANALYSIS_SIDE; low means blurry.

    Measured in a 4x4 grid and averaged over the sharpest quarter of the tiles,
    so a portrait with a soft background is judged by its subject.
    """
    gray = _analysis_gray(image)
    if min(gray.shape) < 3:
        return 0.0
    laplacian = (gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:]) - 4 * gray[1:-1, 1:-1]
    rows = np.array_split(np.arange(laplacian.shape[0]), 4)
    columns = np.array_split(np.arange(laplacian.shape[1]), 4)
    tiles = sorted((laplacian[r[0]:r[-1] + 1, c[0]:c[-1] + 1].var() for r in rows for c in columns if len(r) and len(c)),
                   reverse=True)
    return float(np.mean(tiles[:max(1, len(tiles) // 4)]))


def _dct_matrix(size: int) -> np.ndarray:
    k = np.arange(size)[:, None]
    n = np.arange(size)[None, :]
    matrix = np.cos(np.pi * (2 * n + 1) * k / (2 * size)) * np.sqrt(2.0 / size)
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT32 = _dct_matrix(32)


def perceptual_hash(image: Image.Image) -> str:
    """64-bit pHash: signs of the lowest 8x8 DCT frequencies against their median, as 16 hex digits.

    Survives resizing, re-encoding and small colour changes, unlike a file hash.
    """
    small = image.convert("L").resize((32, 32), Image.Resampling.BOX if max(image.size) > 64 else
                                      Image.Resampling.BICUBIC)
    pixels = np.asarray(small, dtype=np.float64)
    low = (_DCT32 @ pixels @ _DCT32.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term (overall brightness) would skew the median
    return f"{int(''.join('1' if bit else '0' for bit in bits), 2):016x}"


def hash_distance(first: str, second: str) -> int:
    """How many of the 64 bits differ."""
    return (int(first, 16) ^ int(second, 16)).bit_count()
