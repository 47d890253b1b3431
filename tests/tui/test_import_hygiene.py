"""The engine stays a headless library: importing any of it pulls in no Textual, and a contract keeps it so."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

IMPORT_EVERY_ENGINE_MODULE = """
import importlib, json, pkgutil, sys
import engine
names = ["engine"]
for module in pkgutil.walk_packages(engine.__path__, "engine."):
    importlib.import_module(module.name)
    names.append(module.name)
print(json.dumps({"imported": names, "ui": sorted(m for m in sys.modules
                                                  if m.split(".")[0] in ("textual", "tui", "textual_image"))}))
"""


def test_importing_every_engine_module_loads_no_textual():
    done = subprocess.run([sys.executable, "-c", IMPORT_EVERY_ENGINE_MODULE], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the walk really covered the engine, trainer included
    assert {"engine.trainer", "engine.config", "engine.images", "engine.memory"} <= set(result["imported"])
    assert result["ui"] == []


def test_the_import_contract_in_pyproject_holds():
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert command, "import-linter is not installed (pip install import-linter)"
    done = subprocess.run([command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 broken" in done.stdout
