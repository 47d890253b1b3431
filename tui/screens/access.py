"""Access: before the first step, make sure the base model is on this machine.

FLUX.1-dev is gated: Hugging Face serves it only to accounts that accepted
its license, with a token. The token is handed to huggingface_hub's own
`login` (the same store `hf auth login` uses); this program never writes it
anywhere. The download goes through huggingface_hub too, so an interrupted one
resumes where it stopped. The tiny model and local folders skip this screen.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, ProgressBar, Static
from textual.worker import Worker, WorkerState

from tui.messages import AccessChecked, DownloadFinished, DownloadProgress, LoginFailed
from tui.widgets.step_header import StepHeader

log = logging.getLogger(__name__)

SPEED_WINDOW_S = 10.0


def format_bytes(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


class DownloadMeter:
    """Speed over the last few seconds and the time left, from (time, bytes) samples."""

    def __init__(self, window_s: float = SPEED_WINDOW_S) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, done: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window_s:
            self.samples.popleft()

    @property
    def bytes_per_s(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None

    def seconds_left(self, done: int, total: int | None) -> float | None:
        speed = self.bytes_per_s
        if not total or not speed or speed <= 0:
            return None
        return max(0.0, (total - done) / speed)


def describe_download(done: int, total: int | None, speed: float | None, left: float | None) -> str:
    from tui.screens.train import format_duration

    parts = [f"{format_bytes(done)} of {format_bytes(total)}" if total else format_bytes(done)]
    if speed:
        parts.append(f"{format_bytes(speed)}/s")
    if left is not None:
        parts.append(f"about {format_duration(left)} left")
    return " · ".join(parts)


def checked_access(repo_id: str) -> str:
    """engine.flux.hub.check_access; a network failure it does not classify counts as offline."""
    from engine.flux.hub import check_access

    try:
        return check_access(repo_id)
    except Exception as error:  # e.g. a connection error type of a newer huggingface_hub
        log.warning("access check for %s failed: %s", repo_id, error)
        return "offline"


class AccessScreen(Screen):
    TITLE = "Model access"
    CSS_PATH = "access.tcss"
    HELP = """\
The base model's weights come from Hugging Face and are kept in its cache (`HF_HOME`),
shared with every other program that uses huggingface_hub. Only the diffusers folders are
fetched (about 34 GB for FLUX.1); an interrupted download resumes where it stopped.

**FLUX.1-dev is gated.** Hugging Face serves it only to accounts that accepted its license:
1. open the model's page (shown on screen) while logged in and accept the license;
2. create a token with *read* access at https://huggingface.co/settings/tokens;
3. paste it in the field and press **Enter**.

The token is stored by huggingface_hub's own login (as `hf auth login` does), never by this
program. FLUX.1-schnell is not gated, and the tiny model needs no download at all.

- **r** checks again (after accepting the license, or once the network is back).
- **Esc** goes back to the review.
"""
    BINDINGS = [
        Binding("r", "retry", "Check again"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.repo_id: str | None = None
        self.status: str | None = None  # the last check's answer
        self.meter = DownloadMeter()
        self.downloading = False
        self.bytes_done = 0

    def compose(self) -> ComposeResult:
        yield StepHeader("train", id="step-header")
        with Vertical(id="access"):
            yield Label("", id="access-title")
            yield Static("", id="access-status")
            with Vertical(id="access-login"):
                yield Static("", id="access-login-steps")
                yield Input(placeholder="hf_… (a read token)", password=True, id="access-token")
                yield Static("", id="access-login-error", classes="inline-error")
            with Vertical(id="access-download"):
                yield ProgressBar(id="access-progress", show_eta=False)
                yield Static("", id="access-bytes")
        yield Footer()

    def on_mount(self) -> None:
        from engine.config import model_source

        state = self.app.state
        model = str((state.config or {}).get("model") or state.model)
        kind, where = model_source(model, Path(state.config_path).parent if state.config_path else Path.cwd())
        if kind in ("tiny", "local"):
            log.info("model %s is %s: no download", model, kind)
            self.call_after_refresh(self.app.goto, "train")
            return
        self.repo_id = where
        self.query_one("#access-title", Label).update(f"Base model: {where}")
        self.check()

    # -- checking and logging in ------------------------------------------------------------------

    def check(self) -> None:
        self._show("checking", Text(f"Checking access to {self.repo_id} on Hugging Face…"))
        self.check_access()

    @work(thread=True, exclusive=True, exit_on_error=False, group="access")
    def check_access(self) -> None:
        self.post_message(AccessChecked(self.repo_id, checked_access(self.repo_id)))

    @work(thread=True, exclusive=True, exit_on_error=False, group="access")
    def log_in(self, token: str) -> None:
        from huggingface_hub import login

        try:
            login(token=token)
        except Exception as error:  # an invalid token is a ValueError or an HTTP 401 depending on version
            log.info("login refused: %s", error)
            self.post_message(LoginFailed(str(error).strip().splitlines()[0] if str(error).strip() else
                                          type(error).__name__))
            return
        self.post_message(AccessChecked(self.repo_id, checked_access(self.repo_id)))

    def on_access_checked(self, message: AccessChecked) -> None:
        self.status = message.status
        log.info("access to %s: %s", message.repo_id, message.status)
        repo = message.repo_id
        if message.status == "cached":
            self._show("cached", Text(f"{repo} is already downloaded."))
            self.app.goto("train")
        elif message.status == "ok":
            self.start_download()
        elif message.status == "gated":
            self._show("gated", Text(f"{repo} is gated: Hugging Face shares it only with accounts that accepted "
                                     "its license, and this machine is not logged in with one."))
            self._ask_token(Text.assemble(
                "1. Open ", (f"https://huggingface.co/{repo}", "underline"),
                " while logged in and accept the license.\n"
                "2. Create a read token at ", ("https://huggingface.co/settings/tokens", "underline"), ".\n"
                "3. Paste it here and press Enter. huggingface_hub stores it (as `hf auth login` does)."))
        elif message.status == "missing":
            self._show("missing", Text(f"Hugging Face has no repo {repo}, or it is private. Esc goes back to "
                                       "choose another model.", style="red"))
            self._ask_token(Text("For a private repo, paste a token of an account that can read it and press "
                                 "Enter (huggingface_hub stores it, as `hf auth login` does)."))
        else:
            self._show("offline", Text("Hugging Face cannot be reached: check the internet connection, "
                                       "then press r to check again.", style="red"))

    def _ask_token(self, steps: Text) -> None:
        self.query_one("#access-login-steps", Static).update(steps)
        self.query_one("#access-login").display = True
        self.query_one("#access-token", Input).focus()

    @on(Input.Submitted, "#access-token")
    def _token_submitted(self, event: Input.Submitted) -> None:
        token = event.value.strip()
        event.input.value = ""  # the token never stays on screen or in the widget
        if not token:
            return
        self.query_one("#access-login-error", Static).update("Checking the token…")
        self.log_in(token)

    def on_login_failed(self, message: LoginFailed) -> None:
        self.query_one("#access-login-error", Static).update(
            f"Hugging Face refused this token ({message.reason}). Copy it again from "
            "https://huggingface.co/settings/tokens.")

    # -- downloading ------------------------------------------------------------------------------

    def start_download(self) -> None:
        self._show("downloading", Text(f"Downloading {self.repo_id} (diffusers folders only). An interrupted "
                                       "download resumes where it stopped."))
        self.query_one("#access-download").display = True
        self.downloading = True
        self.meter = DownloadMeter()
        self.bytes_done = 0
        self.download()

    @work(thread=True, exclusive=True, exit_on_error=False, group="download")
    def download(self) -> None:
        from engine.flux.hub import resolve_model_path

        path = resolve_model_path(self.repo_id, progress=lambda done, total: self.post_message(
            DownloadProgress(done, total)))
        self.post_message(DownloadFinished(path))

    def on_download_progress(self, message: DownloadProgress) -> None:
        # huggingface_hub reports several byte counters; show the furthest one so the bar never goes back
        if message.done < self.bytes_done:
            return
        self.bytes_done = message.done
        self.meter.add(message.done)
        self.query_one("#access-progress", ProgressBar).update(total=message.total, progress=message.done)
        self.query_one("#access-bytes", Static).update(describe_download(
            message.done, message.total, self.meter.bytes_per_s, self.meter.seconds_left(message.done, message.total)))

    def on_download_finished(self, message: DownloadFinished) -> None:
        self.downloading = False
        log.info("model ready in %s", message.path)
        self._show("done", Text(f"{self.repo_id} is downloaded."))
        self.app.goto("train")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state != WorkerState.ERROR:
            return
        from engine.errors import UserError

        error = event.worker.error
        self.downloading = False
        if isinstance(error, UserError):
            text = Text(error.message, style="red")
            if error.hint:
                text.append(f"\nWhat to do: {error.hint}", style="")
        else:
            log.error("access or download failed", exc_info=error)
            text = Text(f"{type(error).__name__}: {error}", style="red")
        text.append("\nPress r to try again.")
        self._show("failed", text)

    # -- keys -------------------------------------------------------------------------------------

    def action_retry(self) -> None:
        if self.repo_id and not self.downloading:
            self.check()

    def action_back(self) -> None:
        self.app.goto("review")

    def _show(self, status: str, text: Text) -> None:
        self.query_one("#access-status", Static).update(text)
        if status not in ("gated", "missing"):
            self.query_one("#access-login").display = False
        if status not in ("downloading", "done"):
            self.query_one("#access-download").display = False
