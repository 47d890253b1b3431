"""Checkpoint zips in mflux's layout (FORMATS.md section 3), written atomically.

mflux writes its zip in place, so a crash mid-write leaves a broken file; we
write to a temporary file in the same folder, fsync it and rename it into
place, so every `NNNNNNN_checkpoint.zip` that exists is complete.
"""
from __future__ import annotations

import json
import logging
import shlex
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from engine.errors import CheckpointError, OutputError
from engine.paths import atomic_write

log = logging.getLogger(__name__)

CHECKPOINT_FOLDER = "_checkpoints"
PARTIAL_SUFFIX = ".partial"
# a temporary file older than this process and not touched for a minute belongs to a run that died mid-write
_PROCESS_START = time.time()
STALE_PARTIAL_S = 60.0
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
        member_name(step, "optimizer"): safetensors_bytes(optimizer_state_for_mflux(contents.optimizer)),
        member_name(step, "iterator"): json.dumps(contents.iterator, indent=2).encode(),
        member_name(step, "loss"): json.dumps(contents.loss, indent=2).encode(),
        member_name(step, "config"): json.dumps(contents.config, indent=2).encode(),
        "checkpoint.json": json.dumps(manifest, indent=2).encode(),
    }
    write_zip_atomically(target, members)
    return target


def write_zip_atomically(target: Path, members: dict[str, bytes]) -> None:
    try:
        with atomic_write(target, suffix=PARTIAL_SUFFIX, fsync=True) as temporary:
            with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED) as archive:
                for name, data in members.items():
                    archive.writestr(name, data)
    except OSError as error:
        raise OutputError(f"could not write checkpoint {target.name} to {target.parent} ({error.strerror})",
                          "free disk space or choose an output folder you can write to (save.output_path); "
                          "earlier checkpoints are intact") from error
    remove_stale_partials(target.parent)


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete temporary checkpoint files left by runs killed mid-write; returns what was removed.

    Never touches one that another live run may still be writing (recently modified).
    """
    removed = []
    cutoff = min(_PROCESS_START, time.time() - STALE_PARTIAL_S)
    for path in Path(folder).glob(f".*_checkpoint.zip.*{PARTIAL_SUFFIX}"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


def read_checkpoint(path: Path) -> CheckpointContents:
    """Open, check and read a checkpoint zip (ours or mflux's)."""
    from safetensors.numpy import load as load_safetensors

    path = Path(path)
    if path.is_dir():
        newest = newest_checkpoint(path)
        raise CheckpointError(f"{path} is a folder, not a checkpoint zip",
                              f"pass a checkpoint zip inside it; the newest is {newest}" if newest else
                              "there is no checkpoint in it; pass a NNNNNNN_checkpoint.zip, which training writes "
                              f"to <output>/{CHECKPOINT_FOLDER}/")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist", "give the path of a NNNNNNN_checkpoint.zip")
    try:
        with open(path, "rb") as file:
            _refuse_other_files(path, file.read(64))
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for name in names:
                if name.startswith(("/", "\\")) or ".." in Path(name).parts or "/" in name or "\\" in name or ":" in name:
                    raise CheckpointError(f"{path.name} contains an unsafe member name {name!r}",
                                          "this is not a checkpoint written by dreambooth-wizard or mflux: do not use it")
            manifest = json.loads(archive.read("checkpoint.json")) if "checkpoint.json" in names else {}
            files = _member_names(manifest, names, path)
            data = {kind: archive.read(files[kind]) for kind in MEMBER_KINDS}
    except CheckpointError:
        raise
    except OSError as error:
        raise CheckpointError(f"cannot read {path} ({error.strerror})",
                              "check the file's permissions, or copy it somewhere you can read it") from error
    # a damaged zip fails in many ways: bad headers, bad CRC, broken deflate data, encrypted or unknown members
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
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
    _check_shapes(path, iterator, loss, config)
    step = int(iterator["num_iterations"])
    return CheckpointContents(step=step, adapter=data["adapter"],
                              optimizer={k: mx.array(v) for k, v in optimizer_state_from_mflux(optimizer_np).items()},
                              iterator=iterator, loss=loss, config=config, manifest=manifest)


def _refuse_other_files(path: Path, head: bytes) -> None:
    """A LoRA or a config given as a checkpoint is named for what it is, not called a damaged zip."""
    if head.startswith(b"PK"):
        return
    newest = newest_checkpoint(path.parent)
    instead = f"pass a checkpoint zip instead: {newest or f'<output>/{CHECKPOINT_FOLDER}/NNNNNNN_checkpoint.zip'}"
    # safetensors: 8 bytes giving the length of a JSON header, then the header
    if len(head) > 8 and head[8:9] == b"{":
        raise CheckpointError(f"{path.name} is a LoRA file, not a checkpoint",
                              "a LoRA is already the result of training: use it as it is (dreambooth-wizard generate "
                              f"--lora-paths {shlex.quote(str(path))}); to export it in another format or to resume "
                              f"training, {instead}")
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] != b"{":
        return  # damaged, or no checkpoint at all: the zip reader says so
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError:  # not JSON after all; an OSError is read_checkpoint's to report
        data = None
    if not isinstance(data, dict) or ("lora_layers" not in data and "examples" not in data):
        raise CheckpointError(f"{path.name} is a JSON file, not a checkpoint", instead)
    output = data.get("save", {}).get("output_path") if isinstance(data.get("save"), dict) else None
    if isinstance(output, str) and output.strip():
        newest = newest_checkpoint(path.parent / Path(output).expanduser()) or newest  # relative to the config
        instead = f"pass a checkpoint zip instead: {newest}" if newest else instead
    raise CheckpointError(f"{path.name} is a training config, not a checkpoint",
                          f"{instead} (to train from this config: dreambooth-wizard train --train-config "
                          f"{shlex.quote(str(path))})")


def newest_checkpoint(folder: Path) -> Path | None:
    """The readable checkpoint with the most steps in an output folder (or its _checkpoints folder)."""
    found = list_checkpoints(folder)
    return found[-1].path if found else None


def _check_shapes(path: Path, iterator, loss, config) -> None:
    """The JSON members hold what a resume reads (an object, a list, an object), or the zip is not a checkpoint."""
    problems = []
    if not isinstance(iterator, dict) or isinstance(iterator.get("num_iterations"), bool) \
            or not isinstance(iterator.get("num_iterations"), int):
        problems.append("its iterator has no step count (num_iterations)")
    if not isinstance(loss, list) or not all(isinstance(entry, dict) for entry in loss):
        problems.append("its loss history is not a list of {step, loss, time}")
    if not isinstance(config, dict) or not isinstance(config.get("examples", {}), dict):
        problems.append("its config is not a training config object")
    if problems:
        raise CheckpointError(f"{path.name} is damaged: {'; '.join(problems)}",
                              "use an earlier checkpoint from the same folder")


def _member_names(manifest, names: list[str], path: Path) -> dict[str, str]:
    files = {}
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    listed = listed if isinstance(listed, dict) else {}
    for key, kind in MANIFEST_FILES_KEYS.items():
        name = listed.get(key)
        if not isinstance(name, str):
            candidates = [n for n in names if n.endswith(f"_{kind}.{'safetensors' if kind in ('adapter', 'optimizer') else 'json'}")]
            name = candidates[0] if candidates else None
        if name is None or name not in names:
            raise CheckpointError(f"{path.name} lacks its {kind} member",
                                  "the checkpoint is incomplete; use an earlier one from the same folder")
        files[kind] = name
    return files


def flatten_optimizer_state(state) -> dict[str, mx.array]:
    return {key: value for key, value in tree_flatten(state) if isinstance(value, mx.array)}


# mflux updates the whole Flux1 model, so its optimizer state sits under "transformer.", with its own layer
# names and its LoRA matrices stored transposed (A (in, r), B (r, out)); ours are A (r, in), B (out, r)
MFLUX_OPTIMIZER_PREFIX = "transformer."


def optimizer_state_for_mflux(flat: dict) -> dict:
    """Our flat optimizer state in mflux's keys and orientation, so mflux resumes with its moments."""
    from engine.lora_formats import MFLUX_NAMES

    converted = {}
    for key, value in flat.items():
        module_path, lora, rest = _split_lora_key(key)
        if module_path is None or key.startswith(MFLUX_OPTIMIZER_PREFIX):
            converted[key] = value  # step, learning_rate, ... (or already mflux's)
            continue
        for ours, theirs in MFLUX_NAMES.items():
            if module_path.endswith("." + ours):
                module_path = module_path[: -len(ours)] + theirs
        converted[f"{MFLUX_OPTIMIZER_PREFIX}{module_path}.{lora}{rest}"] = _transposed(value)
    return converted


def optimizer_state_from_mflux(flat: dict) -> dict:
    """The inverse: keys under "transformer." are mflux's layout; anything else is already ours."""
    from engine.lora_formats import MFLUX_NAMES

    converted = {}
    for key, value in flat.items():
        module_path, lora, rest = _split_lora_key(key)
        if module_path is None or not module_path.startswith(MFLUX_OPTIMIZER_PREFIX):
            converted[key] = value
            continue
        module_path = module_path[len(MFLUX_OPTIMIZER_PREFIX):]
        for ours, theirs in MFLUX_NAMES.items():
            if module_path.endswith("." + theirs):
                module_path = module_path[: -len(theirs)] + ours
        converted[f"{module_path}.{lora}{rest}"] = _transposed(value)
    return converted


def _transposed(value):
    """A 2-D matrix transposed into a fresh row-major copy (numpy or MLX); other arrays as they are.

    A strided view would take other kernels in the compiled step, and resume must be bit-exact.
    """
    if value.ndim != 2:
        return value
    return np.ascontiguousarray(value.T) if isinstance(value, np.ndarray) else mx.contiguous(value.T)


def _split_lora_key(key: str) -> tuple[str | None, str, str]:
    """"a.b.lora_A.m" -> ("a.b", "lora_A", ".m"); (None, "", "") for a key not on a LoRA matrix."""
    for lora in (".lora_A", ".lora_B"):
        head, found, tail = key.partition(lora)
        if found and (not tail or tail.startswith(".")):
            return head, lora[1:], tail
    return None, "", ""


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    created: datetime
    last_loss: float | None
    config: dict
    images_present: bool
    model: str


# what reading a damaged or foreign zip's small members can raise (see _read_json_members)
UNREADABLE_CHECKPOINT = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, KeyError,
                         ValueError, TypeError, AttributeError, CheckpointError, OSError)


def _read_json_members(path: Path) -> tuple[dict, list, dict]:
    """A checkpoint's small members (iterator, loss history, config), checked, without the tensors;
    raises what zipfile, json or _check_shapes raise for a damaged one."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        manifest = json.loads(archive.read("checkpoint.json")) if "checkpoint.json" in names else {}
        files = _member_names(manifest, names, path)
        iterator = json.loads(archive.read(files["iterator"]))
        loss = json.loads(archive.read(files["loss"]))
        config = json.loads(archive.read(files["config"]))
    _check_shapes(path, iterator, loss, config)
    return iterator, loss, config


def read_loss_history(path: Path) -> list[tuple[int, float]]:
    """(step, loss) of every step so far, from a checkpoint's loss member (the resumed run's curve);
    empty, with a log line, when the checkpoint cannot be read (resuming from it then says why)."""
    try:
        _, loss, _ = _read_json_members(Path(path))
        return [(int(entry["step"]), float(entry["loss"])) for entry in loss]
    except UNREADABLE_CHECKPOINT as error:
        log.warning("no loss history from %s: %s", path, error)
        return []


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
                iterator, loss, config = _read_json_members(path)
                images = config.get("examples", {}).get("images", [])
                base = Path(str(config.get("examples", {}).get("path", ".")))
                present = bool(images) and all(isinstance(entry, dict) and (base / str(entry.get("image", ""))).is_file()
                                               for entry in images)
                info = CheckpointInfo(
                    path=path, step=int(iterator["num_iterations"]),
                    created=datetime.fromtimestamp(path.stat().st_mtime),
                    last_loss=float(loss[-1]["loss"]) if loss else None, config=config,
                    images_present=present, model=str(config.get("model", "?")))
            except UNREADABLE_CHECKPOINT as error:
                log.warning("skipping unreadable checkpoint %s (%s)", path, error)
                continue
            found[path.resolve()] = info
    return sorted(found.values(), key=lambda info: (info.step, info.created))
