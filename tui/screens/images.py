"""Images: choose the photos, see each one checked, and set the part of each that is trained."""
from __future__ import annotations

import logging
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, DirectoryTree, Input, Static

from engine.crops import default_crop, fit_crop
from engine.images import IMAGE_SUFFIXES, count_advice, find_images
from tui.screens.step import StepScreen, display_path, training_size
from tui.state import ImageChoice
from tui.widgets.image_tree import ImageTree
from tui.widgets.thumbnail import Thumbnail

log = logging.getLogger(__name__)

THUMBNAIL_SIDE = 256
NOTE_WIDTH = 20
ICONS = {"ok": ("✓", "green"), "warning": ("⚠", "yellow"), "rejected": ("✗", "red"), None: ("…", "dim")}


class ImagesChecked(Message):
    def __init__(self, reports: list) -> None:
        self.reports = reports
        super().__init__()


class ThumbnailLoaded(Message):
    def __init__(self, path: Path, picture, problem: str = "") -> None:
        self.path = path
        self.picture = picture
        self.problem = problem
        super().__init__()


class ImagesScreen(StepScreen):
    STEP = "images"
    BACK = "welcome"
    NEXT = "label"
    TITLE = "Images"
    CSS_PATH = "images.tcss"
    HELP = """\
Choose **5-20 photos** of your subject (10-20 is ideal): different places, light, angles and
distances, the subject clearly visible. Each photo is checked:

- ✓ fine; ⚠ usable but weaker (small, blurry, nearly the same as another, very elongated);
- ✗ cannot be used (unreadable, or shorter side under 256 pixels): left out of training.

**Choosing**: type a folder or file in the box at the top and press **Enter**, or move through the
folders on the left (arrows, **Enter** opens a folder or adds a photo) and press **a** to add the
highlighted folder or photo. **Tab** moves between the browser, the list and the box.

**Cropping**: each photo is cut to the training shape (a centred box at first). Highlight a photo
in the list and press **c** (or **Enter**) to move or resize its box. **x** removes the highlighted photo.
**Ctrl+N** goes on to labelling, **Esc** back.
"""
    BINDINGS = [
        Binding("a", "add_highlighted", "Add"),
        Binding("c", "crop", "Crop"),
        Binding("x,delete", "remove", "Remove"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.thumbnails: dict[Path, object] = {}  # path -> small PIL copy
        self.checking = False

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="images-main"):
            with Vertical(id="browser"):
                yield Input(placeholder="type a path, Enter", id="path-input")
                yield Static("", id="path-error", classes="inline-error")
                yield ImageTree(self._browse_root(), id="tree")
            with Vertical(id="image-list"):
                yield DataTable(id="image-table", cursor_type="row", zebra_stripes=True)
                yield Static("", id="advice")
            with Vertical(id="preview"):
                yield Thumbnail("highlight a photo to see it", id="thumbnail")
                yield Static("", id="preview-caption")

    def _browse_root(self) -> Path:
        if self.app.browse_root is not None:
            return Path(self.app.browse_root)
        if self.app.state.images:
            return self.app.state.images[0].path.parent.parent
        return Path.home()

    def on_mount(self) -> None:
        table = self.query_one("#image-table", DataTable)
        table.add_column(" ", key="icon", width=1)
        table.add_column("Photo", key="name", width=14)
        table.add_column("Note", key="note", width=NOTE_WIDTH)
        self.refresh_table()
        if any(image.size is None for image in self.app.state.images):
            self.start_check()
        self.query_one("#tree", ImageTree).focus()

    # ---------------------------------------------------------------- adding and removing

    @on(Input.Submitted, "#path-input")
    def _path_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.add_path(Path(text).expanduser()):
            event.input.value = ""

    @on(DirectoryTree.FileSelected)
    def _file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.add_path(event.path)

    def action_add_highlighted(self) -> None:
        node = self.query_one("#tree", ImageTree).cursor_node
        if node is not None and node.data is not None:
            self.add_path(Path(node.data.path))

    def add_path(self, path: Path) -> bool:
        """Add a folder's photos or one photo; a problem is shown under the box. True if something was added."""
        problem, found = self._photos_at(path)
        self.query_one("#path-error", Static).update(problem)
        if not found:
            return False
        known = {image.path for image in self.app.state.images}
        new = [p for p in found if p not in known]
        if not new:
            self.query_one("#path-error", Static).update(f"Already in the list: {path.name}")
            return False
        self.app.state.images.extend(ImageChoice(p, trigger=self.app.state.trigger) for p in new)
        log.info("added %d photo(s) from %s", len(new), path)
        self.refresh_table()
        self.start_check()
        return True

    def _photos_at(self, path: Path) -> tuple[str, list[Path]]:
        shown = display_path(path)
        try:
            if path.is_dir():
                found = [p.resolve() for p in find_images(path)]
                if found:
                    return "", found
                entries = [p for p in path.iterdir() if not p.name.startswith(".")]
                if not entries:
                    return f"{shown} is empty: choose the folder that holds your photos.", []
                return (f"No photos in {shown}: its {len(entries)} item(s) are not JPEG, PNG, WebP, TIFF or BMP "
                        "files.", [])
            if path.is_file():
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    return f"{path.name} is not a photo: use JPEG, PNG, WebP, TIFF or BMP files.", []
                return "", [path.resolve()]
        except OSError as error:
            return f"{shown} cannot be read ({error.strerror or error}): check its permissions.", []
        return f"{shown} does not exist: check the spelling, or pick it in the browser below.", []

    def action_remove(self) -> None:
        image = self.highlighted_image()
        if image is None:
            return
        self.app.state.images.remove(image)
        self.thumbnails.pop(image.path, None)
        self.refresh_table()
        self.start_check()

    # ---------------------------------------------------------------- checking

    def start_check(self) -> None:
        self.checking = True
        self.check_photos([image.path for image in self.app.state.images])

    @work(thread=True, exclusive=True, exit_on_error=False, group="check")
    def check_photos(self, paths: list[Path]) -> None:
        from engine.images import check_images

        self.post_message(ImagesChecked(check_images(paths)))

    def on_images_checked(self, message: ImagesChecked) -> None:
        by_path = {report.path: report for report in message.reports}
        target = training_size(self.app.state)
        for image in self.app.state.images:
            report = by_path.get(image.path)
            if report is None:
                continue
            image.status, image.reasons = report.status, list(report.reasons)
            if report.size is None or report.status == "rejected":
                image.crop = None
            elif image.size != report.size or image.crop is None:
                image.crop = default_crop(report.size, *target).as_tuple()
            image.size = report.size
        self.checking = any(image.path not in by_path for image in self.app.state.images)
        self.refresh_table()
        self.show_problems([])

    # ---------------------------------------------------------------- the list and the preview

    def refresh_table(self) -> None:
        table = self.query_one("#image-table", DataTable)
        row = table.cursor_row
        table.clear()
        for image in self.app.state.images:
            status = image.status if image.size is not None or image.status == "rejected" else None
            icon, colour = ICONS[status]
            note = short_note(image, status)
            table.add_row(Text(icon, style=colour), shorten(image.path.name, 14), note, key=str(image.path))
        if self.app.state.images:
            table.move_cursor(row=min(row, len(self.app.state.images) - 1))
        self.update_advice()
        self.show_highlighted()

    def update_advice(self) -> None:
        state = self.app.state
        rejected = len(state.images) - len(state.usable_images)
        text = count_advice(len(state.usable_images))
        if rejected:
            text += f" {rejected} rejected photo(s) are left out of training."
        self.query_one("#advice", Static).update(text)

    def highlighted_image(self) -> ImageChoice | None:
        table = self.query_one("#image-table", DataTable)
        images = self.app.state.images
        if not images or not 0 <= table.cursor_row < len(images):
            return None
        return images[table.cursor_row]

    @on(DataTable.RowHighlighted, "#image-table")
    def _row_highlighted(self) -> None:
        self.show_highlighted()

    @on(DataTable.RowSelected, "#image-table")
    def _row_selected(self) -> None:
        self.action_crop()  # Enter on a photo opens its crop, as c does

    def show_highlighted(self) -> None:
        image = self.highlighted_image()
        caption = self.query_one("#preview-caption", Static)
        thumbnail = self.query_one("#thumbnail", Thumbnail)
        if image is None:
            thumbnail.show(None, "highlight a photo to see it")
            caption.update("")
            return
        size = f", {image.size[0]}x{image.size[1]}" if image.size else ""
        lines = [f"{image.path.name}{size}"] + [f"• {reason}" for reason in image.reasons]
        if image.crop:
            lines.append(f"crop {image.crop[2]}x{image.crop[3]} at {image.crop[0]},{image.crop[1]} (c to change)")
        caption.update("\n".join(lines))
        picture = self.thumbnails.get(image.path)
        if picture is not None:
            thumbnail.show(self._cropped_preview(image, picture))
        elif image.status == "rejected":
            thumbnail.show(None, "cannot be shown")
        else:
            thumbnail.show(None, "loading…")
            self.load_thumbnail(image.path)

    def _cropped_preview(self, image: ImageChoice, picture):
        from tui.widgets.crop_editor import cropped

        if not image.crop or not image.size:
            return picture
        from engine.crops import CropBox

        return cropped(picture, CropBox(*image.crop), picture.width / image.size[0])

    @work(thread=True, exclusive=True, exit_on_error=False, group="thumbnail")
    def load_thumbnail(self, path: Path) -> None:
        from engine.errors import ImageError
        from engine.images import open_image

        try:
            picture = open_image(path, max_side=THUMBNAIL_SIDE)
        except ImageError as error:
            self.post_message(ThumbnailLoaded(path, None, error.message))
            return
        self.post_message(ThumbnailLoaded(path, picture))

    def on_thumbnail_loaded(self, message: ThumbnailLoaded) -> None:
        if message.picture is not None:
            self.thumbnails[message.path] = message.picture
            image = self.highlighted_image()
            if image is not None and image.path == message.path:
                self.show_highlighted()
        else:
            self.query_one("#thumbnail", Thumbnail).show(None, message.problem)

    # ---------------------------------------------------------------- cropping

    def action_crop(self) -> None:
        from tui.widgets.crop_editor import CropEditor

        image = self.highlighted_image()
        if image is None or image.size is None or image.status == "rejected":
            self.notify("Highlight a usable, checked photo to crop it.", severity="warning")
            return
        picture = self.thumbnails.get(image.path)
        if picture is None:
            self.notify("The photo is still loading; try again in a moment.")
            self.load_thumbnail(image.path)
            return

        def keep(box: tuple[int, int, int, int] | None) -> None:
            if box is not None:
                image.crop = tuple(box)
                log.info("crop of %s set to %s", image.path.name, box)
                self.show_highlighted()

        self.app.push_screen(CropEditor(image.path, picture, image.size, image.crop,
                                        training_size(self.app.state)), keep)

    # ---------------------------------------------------------------- next step

    def problems(self) -> list[str]:
        state = self.app.state
        if self.checking:
            return ["The photos are still being checked; a moment please."]
        if not state.images:
            return ["Add your photos first: type a folder above the browser and press Enter, or press a on one."]
        if not state.usable_images:
            return ["None of these photos can be used (see the notes): add readable photos of 256 pixels or more."]
        return []


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def short_note(image: ImageChoice, status: str | None) -> str:
    """The first reason, cut to the column; the preview shows them all."""
    if status is None:
        return "checking…"
    if not image.reasons:
        return "ready" if image.crop is None else f"crop {image.crop[2]}x{image.crop[3]}"
    first = image.reasons[0].splitlines()[0]
    more = f" (+{len(image.reasons) - 1})" if len(image.reasons) > 1 else ""
    return shorten(first, NOTE_WIDTH - len(more)) + more


def refit_crops(images: list[ImageChoice], width: int, height: int) -> None:
    """Reshape every crop to a new training aspect (the template may change it), about the same region."""
    from engine.crops import CropBox

    for image in images:
        if image.crop and image.size:
            image.crop = fit_crop(CropBox(*image.crop), image.size, width, height).as_tuple()
