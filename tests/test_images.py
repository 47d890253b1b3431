"""Opening, orienting, converting, cropping and checking photos. Every image is drawn here."""
import hashlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageDraw, ImageEnhance, ImageFilter

from engine.errors import ImageError, UserError
from engine.crops import CropBox, check_crop, default_crop, fit_crop, move_crop, scale_crop
from engine.images import (
    BLUR_THRESHOLD,
    blur_score,
    check_image,
    check_images,
    content_hash,
    count_advice,
    crop_and_resize,
    find_images,
    hash_distance,
    open_image,
    perceptual_hash,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def scene(seed: int, size=(800, 600)) -> Image.Image:
    """A sharp picture of random flat shapes: edges everywhere, different for every seed."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        w, h = (int(v) for v in rng.integers(20, size[0] // 3, 2))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.integers(0, 2) else draw.rectangle)([x, y, x + w, y + h], fill=colour)
    return image


def bands(colours, band_width=100, height=100) -> Image.Image:
    image = Image.new("RGB", (band_width * len(colours), height))
    for i, colour in enumerate(colours):
        image.paste(colour, (i * band_width, 0, (i + 1) * band_width, height))
    return image


def save(image: Image.Image, path, **options):
    image.save(path, **options)
    return path


# ---------------------------------------------------------------- opening


def test_exif_orientation_is_applied(tmp_path):
    image = bands([RED, BLUE], band_width=30, height=30)  # 60 wide: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to display
    path = save(image, tmp_path / "turned.jpg", exif=exif.tobytes(), quality=95)
    opened = open_image(path)
    assert opened.size == (30, 60)
    pixels = np.asarray(opened).astype(int)
    assert np.abs(pixels[10, 15] - RED).max() < 40  # the left edge went to the top
    assert np.abs(pixels[50, 15] - BLUE).max() < 40
    report = check_image(path)
    assert report.was_rotated and report.size == (30, 60)
    assert not check_image(save(image, tmp_path / "plain.jpg")).was_rotated


def test_cmyk_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    for name in ("red.tiff", "red.jpg"):
        opened = open_image(save(cmyk, tmp_path / name))
        assert opened.mode == "RGB"
        assert np.abs(np.asarray(opened)[32, 32].astype(int) - RED).max() < 10


def test_grayscale_becomes_rgb(tmp_path):
    opened = open_image(save(Image.new("L", (8, 8), 128), tmp_path / "gray.png"))
    assert opened.mode == "RGB" and tuple(np.asarray(opened)[0, 0]) == (128, 128, 128)


def test_palette_transparency_becomes_white(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] + list(RED) + [0] * 762)
    image.paste(1, (4, 0, 8, 8))
    image.info["transparency"] = 0
    opened = np.asarray(open_image(save(image, tmp_path / "palette.png", transparency=0)))
    assert tuple(opened[0, 0]) == WHITE and tuple(opened[0, 7]) == RED


@pytest.mark.parametrize("mode, colour, expected", [
    ("RGBA", (255, 0, 0, 128), (255, 127, 127)),
    ("RGBA", (0, 0, 255, 0), WHITE),
    ("LA", (0, 255), (0, 0, 0)),
    ("LA", (0, 0), WHITE),
])
def test_alpha_is_composited_on_white(tmp_path, mode, colour, expected):
    opened = open_image(save(Image.new(mode, (4, 4), colour), tmp_path / "alpha.png"))
    assert opened.mode == "RGB"
    assert np.abs(np.asarray(opened)[0, 0].astype(int) - expected).max() <= 1


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")  # really stored as 16 bits
    opened = np.asarray(open_image(path))
    assert opened[0, :, 0].tolist() == [0, 64, 128, 255]


def test_colour_profile_is_applied_without_damage(tmp_path):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image = bands([RED, GREEN, BLUE], band_width=4, height=4)
    opened = np.asarray(open_image(save(image, tmp_path / "profiled.png", icc_profile=srgb))).astype(int)
    assert np.abs(opened[0, ::4] - np.array([RED, GREEN, BLUE])).max() <= 2


def test_max_side_makes_a_thumbnail(tmp_path):
    path = save(scene(0, (1600, 1200)), tmp_path / "big.jpg")
    assert open_image(path, max_side=200).size == (200, 150)
    assert open_image(path).size == (1600, 1200)


def test_missing_file_folder_and_empty_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        open_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="folder"):
        open_image(tmp_path)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        open_image(tmp_path / "empty.jpg")


def test_a_photo_without_read_permission_says_to_fix_permissions(tmp_path, monkeypatch):
    # as root a chmod cannot take the permission away, so the error is the one open() raises for a non-root user
    path = save(scene(1), tmp_path / "noperm.png")

    def refused(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(Image, "open", refused)
    with pytest.raises(ImageError) as caught:
        open_image(path)
    assert "permission" in caught.value.message and "damaged" not in str(caught.value)
    assert "chmod a+r" in caught.value.hint and str(path) in caught.value.hint
    assert check_image(path).status == "rejected"
    monkeypatch.setattr("engine.images.open", refused, raising=False)
    with pytest.raises(ImageError, match="permission"):
        content_hash(path)


def test_displayed_size_reads_the_header_and_applies_exif_rotation(tmp_path):
    from engine.images import displayed_size

    image = scene(2, (300, 200))
    exif = image.getexif()
    exif[0x0112] = 6  # the camera was held upright
    assert displayed_size(save(image, tmp_path / "upright.jpg", exif=exif)) == (200, 300)
    assert displayed_size(save(scene(2, (300, 200)), tmp_path / "flat.png")) == (300, 200)
    (tmp_path / "notes.png").write_text("not pixels")
    with pytest.raises(ImageError, match="not an image"):
        displayed_size(tmp_path / "notes.png")


def test_non_image_is_an_image_error(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels " * 20)
    with pytest.raises(ImageError, match="not an image") as caught:
        open_image(path)
    assert isinstance(caught.value, UserError) and "JPEG" in str(caught.value)


def test_heic_without_support_says_how_to_convert(tmp_path):
    try:
        import pillow_heif  # noqa: F401
        pytest.skip("pillow-heif is installed")
    except ImportError:
        pass
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    with pytest.raises(ImageError, match="HEIC"):
        open_image(path)


@pytest.mark.parametrize("name", ["cut.jpg", "cut.png"])
def test_truncated_file_is_an_image_error(tmp_path, name):
    whole = save(scene(1), tmp_path / f"whole{name[-4:]}")
    data = whole.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="damaged or incomplete"):
        open_image(tmp_path / name)
    assert check_image(tmp_path / name).status == "rejected"


@pytest.mark.parametrize("side", [100, 40])  # 10,000 pixels: past 2x the limit; 1,600: between 1x and 2x
def test_decompression_bomb_is_an_image_error(tmp_path, monkeypatch, side):
    path = save(Image.new("RGB", (side, side)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="too large to open safely"):
        open_image(path)
    report = check_image(path)
    assert report.status == "rejected" and "too large" in report.reasons[0]


def test_content_hash_is_the_sha256_of_the_bytes(tmp_path):
    path = save(scene(2), tmp_path / "a.png")
    assert content_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    first = content_hash(path)
    save(scene(3), path)
    assert content_hash(path) != first


def test_find_images_lists_only_images(tmp_path):
    for name in ("b.JPG", "a.png", "c.webp", "notes.txt", ".hidden.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()
    assert [p.name for p in find_images(tmp_path)] == ["a.png", "b.JPG", "c.webp"]


# ---------------------------------------------------------------- cropping


def test_default_crop_is_centred_with_the_training_aspect():
    assert default_crop((300, 100), 64, 64) == CropBox(100, 0, 100, 100)
    assert default_crop((100, 300), 512, 512) == CropBox(0, 100, 100, 100)
    assert default_crop((400, 400), 512, 256) == CropBox(0, 100, 400, 200)
    assert default_crop((1000, 1000), 512, 768) == CropBox(166, 0, 667, 1000)


def test_crop_never_stretches_a_wide_photo_into_a_square():
    image = bands([RED, GREEN, BLUE])  # 300x100
    out = crop_and_resize(image, default_crop(image.size, 64, 64), 64, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    # only the middle band survives; a stretch would have squeezed red and blue in at the sides
    assert np.allclose(out[..., 1], 1.0, atol=0.02) and np.allclose(out[..., [0, 2]], -1.0, atol=0.02)


def test_crop_and_resize_equals_cropping_then_resizing():
    image = scene(4, (640, 480))
    box = CropBox(100, 50, 300, 300)
    expected = np.asarray(image.crop((100, 50, 400, 350)).resize((96, 96), Image.Resampling.LANCZOS), np.float32)
    out = crop_and_resize(image, box, 96, 96)
    assert np.abs((out + 1) * 127.5 - expected).mean() < 2.0


def test_crop_box_converts_to_and_from_the_wizards_tuples():
    box = CropBox(1, 2, 30, 40)
    assert tuple(box) == box.as_tuple() == (1, 2, 30, 40)
    assert CropBox.of((1, 2, 30, 40)) == box and CropBox.of(box) is box
    image = scene(4, (640, 480))
    assert np.array_equal(crop_and_resize(image, (100, 50, 300, 300), 32, 32),
                          crop_and_resize(image, CropBox(100, 50, 300, 300), 32, 32))


def test_crop_with_the_wrong_aspect_is_refused():
    image = bands([RED, GREEN, BLUE])
    with pytest.raises(ValueError, match="aspect"):
        crop_and_resize(image, CropBox(0, 0, 200, 100), 64, 64)
    with pytest.raises(ValueError, match="inside"):
        crop_and_resize(image, CropBox(250, 0, 100, 100), 64, 64)
    check_crop(CropBox(0, 0, 667, 1000), (1000, 1000), 512, 768)  # a rounding pixel is fine


def test_move_crop_stops_at_the_edges():
    box = CropBox(100, 0, 100, 100)
    assert move_crop(box, 30, 0, (300, 100)) == CropBox(130, 0, 100, 100)
    assert move_crop(box, 1000, 50, (300, 100)) == CropBox(200, 0, 100, 100)
    assert move_crop(box, -1000, -5, (300, 100)) == CropBox(0, 0, 100, 100)


def test_scale_crop_keeps_aspect_centre_and_bounds():
    size = (1200, 800)
    full = default_crop(size, 512, 768)
    assert scale_crop(full, 2.0, size, 512, 768) == full  # already as large as it can be
    half = scale_crop(full, 0.5, size, 512, 768)
    assert abs(half.height - 400) <= 1 and abs(half.width * 768 - half.height * 512) <= 768
    assert abs((half.left + half.width / 2) - 600) <= 1 and abs((half.top + half.height / 2) - 400) <= 1
    tiny = scale_crop(half, 0.001, size, 512, 768, min_side=64)
    assert tiny.width == 64
    corner = scale_crop(move_crop(half, -1000, -1000, size), 1.5, size, 512, 768)
    check_crop(corner, size, 512, 768)


def test_fit_crop_reshapes_to_a_new_aspect():
    size = (1000, 800)
    square = default_crop(size, 512, 512)
    tall = fit_crop(square, size, 512, 768)
    check_crop(tall, size, 512, 768)
    assert abs((tall.left + tall.width / 2) - 500) <= 1


def test_every_helper_result_is_a_valid_crop():
    rng = np.random.default_rng(0)
    for _ in range(200):
        size = tuple(int(v) for v in rng.integers(64, 2000, 2))
        target = tuple(int(v) for v in rng.choice([256, 512, 768, 1024], 2))
        box = default_crop(size, *target)
        for _ in range(5):
            box = move_crop(box, int(rng.integers(-500, 500)), int(rng.integers(-500, 500)), size)
            box = scale_crop(box, float(rng.uniform(0.3, 3)), size, *target, min_side=16)
            check_crop(box, size, *target)
        check_crop(fit_crop(box, size, target[1], target[0]), size, target[1], target[0])


# ---------------------------------------------------------------- checking


def test_size_rules(tmp_path):
    assert check_image(save(scene(5, (600, 200)), tmp_path / "tiny.png")).status == "rejected"
    small = check_image(save(scene(5, (400, 400)), tmp_path / "small.png"))
    assert small.status == "warning" and "small" in small.reasons[0]
    good = check_image(save(scene(5, (800, 600)), tmp_path / "good.png"))
    assert good.status == "ok" and good.reasons == [] and good.size == (800, 600)
    wide = check_image(save(scene(5, (2000, 600)), tmp_path / "wide.png"))
    assert wide.status == "warning" and "elongated" in wide.reasons[0]


def test_unreadable_file_is_rejected_with_the_reason(tmp_path):
    (tmp_path / "x.png").write_text("nope")
    report = check_image(tmp_path / "x.png")
    assert report.status == "rejected" and "not an image" in report.reasons[0]
    assert report.blur_score is None and report.perceptual_hash is None


def test_blur_scores_order_sharp_before_blurry(tmp_path):
    image = scene(6)
    scores = [blur_score(image.filter(ImageFilter.GaussianBlur(radius))) if radius else blur_score(image)
              for radius in (0, 1, 2, 4)]
    assert scores == sorted(scores, reverse=True) and scores[0] > 2 * scores[2]
    assert scores[0] > BLUR_THRESHOLD > scores[-1]
    blurry = check_image(save(image.filter(ImageFilter.GaussianBlur(6)), tmp_path / "blurry.png"))
    assert blurry.status == "warning" and "blurry" in blurry.reasons[0]
    assert check_image(save(image, tmp_path / "sharp.png")).status == "ok"


def test_sharp_subject_on_soft_background_is_not_called_blurry():
    image = scene(7, (800, 800))
    soft = image.filter(ImageFilter.GaussianBlur(8))
    soft.paste(image.crop((200, 200, 600, 600)), (200, 200))  # a sharp quarter in the middle
    assert blur_score(soft) > BLUR_THRESHOLD


def test_near_duplicates_are_flagged_and_different_photos_are_not(tmp_path):
    original = save(scene(8), tmp_path / "01.png")
    copy = ImageEnhance.Brightness(scene(8).resize((704, 528), Image.Resampling.LANCZOS)).enhance(1.08)
    copy_path = save(copy, tmp_path / "02.jpg", quality=80)
    other = save(scene(9), tmp_path / "03.png")
    reports = check_images([original, copy_path, other])
    assert [r.status for r in reports] == ["ok", "warning", "ok"]
    assert reports[1].reasons == [reports[1].reasons[0]] and "01.png" in reports[1].reasons[0]
    assert hash_distance(reports[0].perceptual_hash, reports[2].perceptual_hash) > 16


def test_perceptual_hash_survives_resizing_but_tells_scenes_apart():
    image = scene(10)
    own = perceptual_hash(image)
    assert len(own) == 16
    assert hash_distance(own, perceptual_hash(image.resize((200, 150)))) <= 4
    distances = [hash_distance(own, perceptual_hash(scene(seed))) for seed in range(11, 21)]
    assert min(distances) > 12


def test_hash_distance_counts_differing_bits():
    assert hash_distance("0" * 16, "0" * 16) == 0
    assert hash_distance("0" * 16, "f" * 16) == 64
    assert hash_distance("000000000000000f", "0000000000000001") == 3


@pytest.mark.parametrize("count, words", [
    (0, "No photos"), (3, "add at least 2 more"), (7, "enough to start"), (15, "ideal"),
    (25, "more than needed"), (40, "more than 30"),
])
def test_count_advice(count, words):
    assert words in count_advice(count)
