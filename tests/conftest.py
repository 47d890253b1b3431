"""Shared test setup: engine first (so the system BLAS is preloaded before mlx),
Hugging Face and platform folders redirected so tests never touch $HOME."""
import os
import tempfile

_sandbox = tempfile.mkdtemp(prefix="dbw-tests-")
os.environ.setdefault("HF_HOME", os.path.join(_sandbox, "hf"))
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("DREAMBOOTH_WIZARD_HOME", os.path.join(_sandbox, "home"))

import engine  # noqa: E402,F401  (preloads the BLAS before anything imports mlx)
