"""The real app in a real terminal: `dreambooth-wizard demo` under tmux at 100x30.

Keys go in with `send-keys`, the screen comes back with `capture-pane`. The
demo walks the setup steps with Ctrl+N, must reach the Train screen, and must
write a checkpoint zip; then Ctrl+C asks, `y` stops the training (with a
checkpoint) and quits.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    """One tmux server of our own (-L), so the user's sessions are never touched."""

    def __init__(self, width: int = 100, height: int = 30):
        self.socket = f"dbw-test-{uuid.uuid4().hex[:8]}"
        self.size = (width, height)

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True,
                              text=True).stdout

    def start(self, command: str, env: dict[str, str]) -> None:
        exports = " ".join(f"{key}={value}" for key, value in env.items())
        self.run("new-session", "-d", "-s", "app", "-x", str(self.size[0]), "-y", str(self.size[1]),
                 f"env {exports} {command}; echo EXITED $?; sleep 120")

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "app", *keys)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "app")

    def wait_for(self, condition, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if condition(text):
                return text
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.screen()}")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def on_train_screen(text: str) -> bool:
    return "peak mem" in text and "Stop" in text


def test_demo_reaches_training_and_writes_a_checkpoint_in_a_real_terminal(tmp_path):
    folder = tmp_path / "demo"
    env = {"DREAMBOOTH_WIZARD_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "TERM": "xterm-256color"}
    tmux = Tmux()
    try:
        tmux.start(f"{sys.executable} -m tui.cli demo --folder {folder}", env)
        tmux.wait_for(lambda text: "toy_01.png" in text, 60, "the Images step with the demo photos")
        for _ in range(8):  # images, label, template, memory, review, then access (skipped for tiny)
            if on_train_screen(tmux.screen()):
                break
            before = tmux.screen()
            tmux.keys("C-n")
            tmux.wait_for(lambda text: text != before, 30, "the next step")
        tmux.wait_for(on_train_screen, 60, "the Train screen")

        checkpoints = lambda: list(folder.glob("output*/_checkpoints/*_checkpoint.zip"))  # noqa: E731
        deadline = time.monotonic() + 300
        while not checkpoints() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert checkpoints(), f"no checkpoint was written; the screen:\n{tmux.screen()}"
        tmux.wait_for(lambda text: "checkpoint at step" in text, 30, "the checkpoint in the log")

        tmux.keys("C-c")
        tmux.wait_for(lambda text: "Quit" in text and "(y)" in text, 30, "the quit question")
        tmux.keys("y")
        text = tmux.wait_for(lambda text: "EXITED" in text, 120, "the app to exit")
        assert "EXITED 0" in text
    finally:
        tmux.kill()
