"""Find FLUX.1 weights: a model name, a Hugging Face repo id, or a local folder.

Downloads go through huggingface_hub, so the user's token (`hf auth login`,
HF_TOKEN), cache (HF_HOME) and offline mode (HF_HUB_OFFLINE) work as everywhere
else. Only the diffusers sub-folders are fetched: the repo root also holds BFL
single-file copies of the same weights (~33 GB we would download twice).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable

from engine.config import MODEL_ALIASES as ALIASES
from engine.errors import ModelAccessError, ModelLoadError

log = logging.getLogger(__name__)

COMPONENT_FOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
ALLOW_PATTERNS = ["model_index.json"] + [f"{folder}/*" for folder in COMPONENT_FOLDERS]
# weights in other formats beside the safetensors would double the download
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.gguf"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

ProgressCallback = Callable[[int, int | None], None]  # (bytes done, bytes total)


def resolve_model_path(name_or_path: str | os.PathLike, progress: ProgressCallback | None = None,
                       token: str | None = None) -> Path:
    """Return a local folder in the diffusers FLUX layout for `name_or_path`.

    `tiny` is built locally; an existing folder is used as is; `dev`, `schnell`
    or a repo id come from the Hugging Face cache, downloading what is missing.
    """
    text = str(name_or_path).strip()
    if text.lower() == "tiny":
        from engine.flux.tiny import ensure_tiny_model

        return ensure_tiny_model()
    local = Path(text).expanduser()
    if local.is_dir():
        return _check_layout(local)
    if local.is_absolute() or text.startswith((".", "~")) or os.sep in text and not REPO_ID.match(text):
        raise ModelLoadError(f"model folder {local} does not exist",
                             "check the path, or use dev, schnell, tiny or a Hugging Face repo id")
    repo_id = ALIASES.get(text.lower(), text)
    if not REPO_ID.match(repo_id):
        raise ModelLoadError(f"unknown model {text!r}",
                             "use dev, schnell, tiny, a Hugging Face repo id (owner/name) or a local folder")
    return _check_layout(download_model(repo_id, progress=progress, token=token))


def download_model(repo_id: str, progress: ProgressCallback | None = None, token: str | None = None) -> Path:
    """The repo's diffusers folders from the cache, downloading what is missing."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    _NOT_CACHED = _not_cached_errors()
    kwargs = dict(repo_id=repo_id, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS, token=token)
    try:
        # a complete cached snapshot works with no network at all
        return Path(snapshot_download(local_files_only=True, **kwargs))
    except _NOT_CACHED:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelAccessError(f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                               "unset HF_HUB_OFFLINE and connect to the internet once to download it")
    log.info("downloading %s (diffusers folders only)", repo_id)
    try:
        tqdm_class = _progress_tqdm(progress) if progress else None
        return Path(snapshot_download(tqdm_class=tqdm_class, **kwargs) if tqdm_class else snapshot_download(**kwargs))
    except hf_errors.GatedRepoError as error:
        raise ModelAccessError(
            f"{repo_id} is gated and this machine has no access to it",
            f"accept the license at https://huggingface.co/{repo_id} while logged in, then run "
            "`hf auth login` (or set HF_TOKEN) with a token of that account") from error
    except hf_errors.RepositoryNotFoundError as error:
        raise ModelAccessError(
            f"no Hugging Face repo {repo_id!r} (or it is private)",
            "check the name; for a private repo run `hf auth login` with a token that can read it") from error
    except (hf_errors.LocalEntryNotFoundError, OSError) as error:
        raise ModelAccessError(
            f"could not download {repo_id}: {_first_line(error)}",
            "check the internet connection (a partial download resumes where it stopped)") from error
    except hf_errors.HfHubHTTPError as error:
        raise ModelAccessError(f"the Hugging Face hub refused {repo_id}: {_first_line(error)}",
                               "try again later, or check your token with `hf auth whoami`") from error


def _not_cached_errors():
    from huggingface_hub import errors as hf_errors

    names = ("LocalEntryNotFoundError", "IncompleteSnapshotError", "CachedRepoTreeNotFoundError")
    return tuple(getattr(hf_errors, n) for n in names if hasattr(hf_errors, n)) + (FileNotFoundError, ValueError)


def check_access(repo_id: str, token: str | None = None) -> str:
    """'cached', 'ok', 'gated', 'missing' or 'offline' for the wizard's access screen."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hf_errors

    _NOT_CACHED = _not_cached_errors()
    repo_id = ALIASES.get(repo_id.lower(), repo_id)
    try:
        snapshot_download(repo_id=repo_id, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS,
                          local_files_only=True, token=token)
        return "cached"
    except _NOT_CACHED:
        pass
    try:
        HfApi().auth_check(repo_id, token=token)
        return "ok"
    except hf_errors.GatedRepoError:
        return "gated"
    except hf_errors.RepositoryNotFoundError:
        return "missing"
    except Exception:  # noqa: BLE001  (httpx's connection errors are not OSErrors: any failure here means no answer)
        return "offline"


def _check_layout(folder: Path) -> Path:
    missing = [name for name in ("transformer", "vae") if not (folder / name / "config.json").is_file()]
    if missing:
        raise ModelLoadError(
            f"{folder} is not a FLUX.1 model folder in the diffusers layout (no {', '.join(f'{m}/config.json' for m in missing)})",
            "point to a folder with model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/")
    return folder


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _progress_tqdm(progress: ProgressCallback):
    """A tqdm class that reports bytes to `progress` (huggingface_hub's hook for progress).

    snapshot_download drives several bars through it (files fetched, bytes
    downloaded, xet reconstruction); only the aggregate byte bar is reported.
    """
    from tqdm.auto import tqdm

    class ReportingTqdm(tqdm):
        def update(self, n=1):
            result = super().update(n)
            if str(getattr(self, "desc", "")).startswith("Downloading"):
                progress(int(self.n), int(self.total) if self.total else None)
            return result

    return ReportingTqdm
