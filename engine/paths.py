"""Where the engine keeps its own files (the tiny model, encoding caches, logs) and how it writes the user's.

`DREAMBOOTH_WIZARD_HOME` overrides the platform folders (tests use it so they
never touch the user's home). `atomic_write` is how every file a user keeps is
written: whole or not at all, readable as any other file they make.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

from engine.errors import OutputError

# mkstemp makes 0600 files; a file we write gets the mode any new file would (a ComfyUI service account must read
# a LoRA). The umask can only be read by setting it, and it is process-wide: read once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _folder(kind: str, create: bool = True) -> Path:
    home = os.environ.get("DREAMBOOTH_WIZARD_HOME")
    if home:
        path = Path(home).expanduser() / kind
    else:
        import platformdirs

        find = {"cache": platformdirs.user_cache_dir, "logs": platformdirs.user_log_dir}[kind]
        path = Path(find("dreambooth-wizard"))
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    return _folder("cache")


def log_dir() -> Path:
    return _folder("logs")


def keep_compiled_gpu_kernels(mlx_version: str) -> str:
    """Point MLX's CUDA kernel cache into our cache folder, per MLX version; returns the folder.

    MLX compiles its CUDA kernels on first use and keeps them in /tmp/mlx/<version>/ptx, which a
    reboot empties: then a first training step spends minutes compiling again (bench/NOTES.md).
    Must run before MLX compiles its first kernel (load_model calls it on CUDA); MLX creates the
    folder. A folder the user set (MLX_PTX_CACHE_DIR) is kept."""
    if os.environ.get("MLX_PTX_CACHE_DIR"):
        return os.environ["MLX_PTX_CACHE_DIR"]
    folder = str(_folder("cache", create=False) / "mlx-cuda-kernels" / mlx_version)
    os.environ["MLX_PTX_CACHE_DIR"] = folder
    return folder


def new_file_mode() -> int:
    """The permission bits a file created now gets (0644 under the usual umask 022)."""
    return 0o666 & ~_UMASK


@contextmanager
def atomic_write(path: str | Path, suffix: str = ".tmp", fsync: bool = False) -> Iterator[Path]:
    """Write `path` whole or not at all: yields a temporary file beside it to write to.

    When the block ends, the temporary file gets `new_file_mode()`, is flushed to the disk if `fsync` (and the
    rename with it), and replaces `path` in one rename; if the block raises, it is removed and `path` is untouched.
    Its name is `.<name>.<random><suffix>`. OSError (no permission, full disk) reaches the caller, who says what
    to do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, new_file_mode())  # after the block: a writer may have made the file anew
        if fsync:
            _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (a rename), to the disk; a file system that cannot is let be."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def output_file(output: str | Path, example_name: str, what: str) -> Path:
    """`output` (a command's -o) as the path of a file to write: an OutputError where it is empty or names a
    folder, which would otherwise end in a puzzling OS error (writing onto "."), with `example_name` as the
    file to suggest and `what` as what the file is ("LoRA file", "image file")."""
    text = str(output)
    if not text.strip():
        raise OutputError("no output file given (-o is empty)", f"name the {what} to write, e.g. -o {example_name}")
    path = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise OutputError(f"{text} is a folder; -o names the {what} to write",
                          f"name a file in it, e.g. -o {path / example_name}")
    return path


def unwritable_reason(folder: Path) -> str | None:
    """Why `folder` cannot be written to (it is created if missing, then probed), or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".dreambooth-wizard-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        return _file_in_the_way(folder) or error.strerror or str(error)
    return None


def _file_in_the_way(folder: Path) -> str | None:
    """Says so where `folder`, or a folder above it, is a file (mkdir's "File exists" or "Not a directory")."""
    for path in (folder, *folder.parents):
        if os.path.lexists(path):
            if os.path.isdir(path):
                return None
            return "it is a file, not a folder" if path == folder else f"{path.name} is a file, not a folder"
    return None


def prepare_output_folder(output: Path, fresh: bool) -> Path:
    """The folder a run writes to, created and probed. A fresh run never writes into an earlier run's folder:
    it gets a new one beside it, with the date (mflux appends a timestamp the same way)."""
    try:
        earlier_run = fresh and output.is_dir() and any(output.iterdir())
    except OSError as error:
        raise OutputError(f"cannot read the output folder {output} ({error.strerror})",
                          "set save.output_path to a folder you can read and write") from error
    if earlier_run:
        output = output.with_name(f"{output.name}_{datetime.now():%Y%m%d_%H%M%S}")
    reason = unwritable_reason(output)
    if reason:
        raise OutputError(f"cannot write to the output folder {output} ({reason})",
                          "set save.output_path to a folder you can write to")
    return output
