"""Checkpoint zips in mflux's layout (FORMATS.md section 3), written atomically.

mflux writes its zip in place, so a crash mid-write leaves a broken file; we
write to a temporary file in the same folder, fsync it and rename it into
place, so every `NNNNNNN_checkpoint.zip` that exists is complete.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from engine.errors import CheckpointError, OutputError

log = logging.getLogger(__name__)

CHECKPOINT_FOLDER = "_checkpoints"
MEMBER_KINDS = ("adapter", "optimizer", "iterator", "loss", "config")
MANIFEST_FILES_KEYS = {"lora_adapter": "adapter", "optimizer": "optimizer", "iterator": "iterator",
                       "loss": "loss", "config": "config"}


def member_name(step: int, kind: str) -> str:
    suffix = "safetensors" if kind in ("adapter", "optimizer") else "json"
    return f"{step:07d}_{kind}.{suffix}"


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_FOLDER / f"{step:07d}_checkpoint.zip"


@dataclass
class CheckpointContents:
    step: int
    adapter: bytes  # the LoRA as an mflux-format safetensors file
    optimizer: dict[str, mx.array]
    iterator: dict
    loss: list[dict]
    config: dict
    manifest: dict = field(default_factory=dict)


def safetensors_bytes(arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.numpy import save

    import numpy as np

    return save({k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v) for k, v in arrays.items()},
                metadata=metadata)


def write_checkpoint(output_dir: Path, contents: CheckpointContents, started: datetime) -> Path:
    """Write the zip atomically; returns its path."""
    step = contents.step
    target = checkpoint_path(output_dir, step)
    now = datetime.now()
    manifest = {
        "metadata": {"start": started.isoformat(), "end": now.isoformat(),
                     "duration": str(now - started), "number_of_training_examples": len(contents.config.get("examples", {}).get("images", []))},
        "files": {key: member_name(step, kind) for key, kind in MANIFEST_FILES_KEYS.items()},
    }
    members = {
        member_name(step, "adapter"): contents.adapter,
        member_name(step, "optimizer"): safetensors_bytes(contents.optimizer),
        member_name(step, "iterator"): json.dumps(contents.iterator, indent=2).encode(),
        member_name(step, "loss"): json.dumps(contents.loss, indent=2).encode(),
        member_name(step, "config"): json.dumps(contents.config, indent=2).encode(),
        "checkpoint.json": json.dumps(manifest, indent=2).encode(),
    }
    write_zip_atomically(target, members)
    return target


def write_zip_atomically(target: Path, members: dict[str, bytes]) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    except OSError as error:
        raise OutputError(f"cannot write checkpoints to {target.parent} ({error.strerror})",
                          "choose an output folder you can write to (save.output_path)") from error
    try:
        with os.fdopen(handle, "wb") as raw:
            with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED) as archive:
                for name, data in members.items():
                    archive.writestr(name, data)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temporary, target)
        _fsync_folder(target.parent)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise OutputError(f"could not write checkpoint {target.name} ({error.strerror})",
                          "free disk space or choose another output folder; earlier checkpoints are intact") from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def read_checkpoint(path: Path) -> CheckpointContents:
    """Open, check and read a checkpoint zip (ours or mflux's)."""
    from safetensors.numpy import load as load_safetensors

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist", "give the path of a NNNNNNN_checkpoint.zip")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for name in names:
                if name.startswith(("/", "\\")) or ".." in Path(name).parts or "/" in name or "\\" in name or ":" in name:
                    raise CheckpointError(f"{path.name} contains an unsafe member name {name!r}",
                                          "this is not a checkpoint written by dreambooth-wizard or mflux: do not use it")
            manifest = json.loads(archive.read("checkpoint.json")) if "checkpoint.json" in names else {}
            files = _member_names(manifest, names, path)
            data = {kind: archive.read(files[kind]) for kind in MEMBER_KINDS}
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"{path.name} is not a readable zip ({error})",
                              "the file is damaged; use an earlier checkpoint from the same folder") from error
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path.name} is incomplete or damaged ({error})",
                              "use an earlier checkpoint from the same folder") from error
    try:
        load_safetensors(data["adapter"])  # parse now: a damaged member fails here, not mid-resume
        optimizer_np = load_safetensors(data["optimizer"])
        iterator = json.loads(data["iterator"])
        loss = json.loads(data["loss"])
        config = json.loads(data["config"])
    except Exception as error:
        raise CheckpointError(f"{path.name} has a damaged member ({error})",
                              "use an earlier checkpoint from the same folder") from error
    step = int(iterator.get("num_iterations", 0))
    return CheckpointContents(step=step, adapter=data["adapter"],
                              optimizer={k: mx.array(v) for k, v in optimizer_np.items()},
                              iterator=iterator, loss=loss, config=config, manifest=manifest)


def _member_names(manifest: dict, names: list[str], path: Path) -> dict[str, str]:
    files = {}
    listed = manifest.get("files", {})
    for key, kind in MANIFEST_FILES_KEYS.items():
        name = listed.get(key)
        if name is None:
            candidates = [n for n in names if n.endswith(f"_{kind}.{'safetensors' if kind in ('adapter', 'optimizer') else 'json'}")]
            name = candidates[0] if candidates else None
        if name is None or name not in names:
            raise CheckpointError(f"{path.name} lacks its {kind} member",
                                  "the checkpoint is incomplete; use an earlier one from the same folder")
        files[kind] = name
    return files


def flatten_optimizer_state(state) -> dict[str, mx.array]:
    return {key: value for key, value in tree_flatten(state) if isinstance(value, mx.array)}


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    created: datetime
    last_loss: float | None
    config: dict
    images_present: bool
    model: str


def list_checkpoints(output_dir: Path) -> list[CheckpointInfo]:
    """Checkpoints under output_dir (its _checkpoints/ or the folder itself), newest step last.

    Reads only the small JSON members, so listing is quick; damaged zips are skipped with a log line.
    """
    output_dir = Path(output_dir).expanduser()
    folders = [output_dir / CHECKPOINT_FOLDER, output_dir]
    found: dict[Path, CheckpointInfo] = {}
    for folder in folders:
        for path in sorted(folder.glob("*_checkpoint.zip")) if folder.is_dir() else []:
            try:
                with zipfile.ZipFile(path) as archive:
                    names = archive.namelist()
                    manifest = json.loads(archive.read("checkpoint.json")) if "checkpoint.json" in names else {}
                    files = _member_names(manifest, names, path)
                    iterator = json.loads(archive.read(files["iterator"]))
                    loss = json.loads(archive.read(files["loss"]))
                    config = json.loads(archive.read(files["config"]))
            except (zipfile.BadZipFile, KeyError, ValueError, CheckpointError, OSError) as error:
                log.warning("skipping unreadable checkpoint %s (%s)", path, error)
                continue
            images = config.get("examples", {}).get("images", [])
            base = Path(config.get("examples", {}).get("path", "."))
            present = bool(images) and all((base / entry.get("image", "")).is_file() for entry in images)
            found[path.resolve()] = CheckpointInfo(
                path=path, step=int(iterator.get("num_iterations", 0)),
                created=datetime.fromtimestamp(path.stat().st_mtime),
                last_loss=float(loss[-1]["loss"]) if loss else None, config=config,
                images_present=present, model=str(config.get("model", "?")))
    return sorted(found.values(), key=lambda info: (info.step, info.created))
