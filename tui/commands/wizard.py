"""The wizard itself (`dreambooth-wizard` with no subcommand)."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def setup_file_logging() -> Path:
    """Logs go to a file: anything printed under a running Textual app would garble the screen."""
    from engine.paths import log_dir

    path = log_dir() / "wizard.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return path


def run_wizard(start: str = "welcome", state=None) -> int:
    """Open the wizard on screen `start` (welcome, resume, ...); returns the exit code."""
    import engine  # noqa: F401  (preloads the system BLAS before anything imports mlx)

    log_path = setup_file_logging()
    # build the tiny model here, on the main thread: screens look at it from worker threads, and MLX 0.32
    # can abort at exit after short-lived threads ran MLX work (ml-explore/mlx#3126)
    from engine.flux.tiny import ensure_tiny_model

    ensure_tiny_model()
    # textual-image asks the terminal about its graphics on import, which only works before Textual starts
    import tui.widgets.thumbnail  # noqa: F401
    from tui.app import WizardApp

    log.info("wizard opens at %s; log in %s", start, log_path)
    app = WizardApp(state=state, start=start)
    result = app.run()
    return int(result or 0)
