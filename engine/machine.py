"""What this machine can train with: the kind of accelerator, its name and memory.

MLX decides where training runs, so the kind follows MLX's backends (Metal on
Apple Silicon, CUDA where mlx was installed with it, else the CPU), not merely
which hardware is present: an NVIDIA card that this MLX cannot use is reported
in `notes` while the kind stays "cpu". Detection never raises: every probe falls
back to a weaker one, and it costs no imports beyond mlx.
"""
from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

GIB = 2**30
# Metal's recommended working set is what a Mac lends the GPU without swapping;
# when MLX does not report it, three quarters of unified memory is the usual value
APPLE_TRAINING_FRACTION = 0.75
# the CUDA context, cuBLAS/cuDNN workspaces and the display take a slice of the card
CUDA_TRAINING_FRACTION = 0.95
# on a CPU the system, the Python process and the page cache need room too
CPU_RESERVED_FRACTION = 0.15
CPU_RESERVED_MINIMUM = 2 * GIB
PROBE_TIMEOUT_S = 3


@dataclass(frozen=True)
class MachineInfo:
    kind: str  # "apple", "cuda" or "cpu"
    name: str
    total_memory: int  # bytes: unified memory on a Mac, the card's memory on CUDA, RAM on a CPU
    available_for_training: int  # bytes the estimate is compared with
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def compute_dtype_bytes(self) -> int:
        # the engine computes in bf16 on a GPU and in float32 on a CPU (loading.default_dtype)
        return 4 if self.kind == "cpu" else 2

    def describe(self) -> str:
        return (f"{self.name} ({self.kind}): {self.total_memory / GIB:.1f} GiB, "
                f"{self.available_for_training / GIB:.1f} GiB usable for training")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data


def detect_machine() -> MachineInfo:
    """This machine as MLX will use it; never raises."""
    mx = _import_mlx()
    for probe in (_probe_apple, _probe_cuda):
        try:
            found = probe(mx)
        except Exception as error:  # a probe must never stop the wizard
            log.debug("%s failed: %s", probe.__name__, error)
            found = None
        if found is not None:
            return found
    return _probe_cpu(mx)


def _import_mlx():
    try:
        import mlx.core as mx

        return mx
    except Exception as error:
        log.debug("mlx is not importable: %s", error)
        return None


def _device_info(mx, device=None) -> dict:
    """mx.device_info (MLX 0.32) or mx.metal.device_info (older), {} if neither answers."""
    for read in (lambda: mx.device_info(device) if device is not None else mx.device_info(),
                 lambda: mx.metal.device_info()):
        try:
            info = read()
            if info:
                return dict(info)
        except Exception:
            continue
    return {}


def _probe_apple(mx) -> MachineInfo | None:
    if mx is None or not mx.metal.is_available():
        return None
    info = _device_info(mx, mx.gpu)
    total = int(info.get("memory_size") or info.get("total_memory") or _sysctl_int("hw.memsize") or _ram_bytes())
    available = int(info.get("max_recommended_working_set_size") or total * APPLE_TRAINING_FRACTION)
    name = _sysctl_text("machdep.cpu.brand_string") or str(info.get("device_name") or "Apple Silicon")
    return MachineInfo("apple", name, total, min(available, total))


def _probe_cuda(mx) -> MachineInfo | None:
    cuda = getattr(mx, "cuda", None) if mx is not None else None
    if cuda is None or not cuda.is_available():
        return None
    info = _device_info(mx, mx.gpu)
    smi_name, smi_total = _nvidia_smi()
    total = int(info.get("total_memory") or info.get("memory_size") or smi_total or 0)
    available = int(total * CUDA_TRAINING_FRACTION)
    free = int(info.get("free_memory") or 0)
    if free:  # memory other processes hold is not ours to plan with
        available = min(available, free)
    name = str(info.get("device_name") or smi_name or "NVIDIA GPU")
    return MachineInfo("cuda", name, total, available)


def _probe_cpu(mx) -> MachineInfo:
    total = 0
    try:
        total = _ram_bytes()
    except Exception as error:
        log.debug("reading the RAM size failed: %s", error)
    available = max(0, total - max(CPU_RESERVED_MINIMUM, int(total * CPU_RESERVED_FRACTION)))
    notes = []
    smi_name, _ = _nvidia_smi()
    if smi_name:
        notes.append(f"{smi_name} found, but this MLX has no CUDA backend: "
                     "install it with `pip install 'mlx[cuda13]'` to train on the GPU")
    name = _cpu_model_name()
    if not name and mx is not None:
        name = str(_device_info(mx, mx.cpu).get("device_name") or "")
    name = name or platform.processor() or platform.machine() or "CPU"
    return MachineInfo("cpu", name, total, available, tuple(notes))


def _ram_bytes() -> int:
    """Physical RAM, capped by a cgroup memory limit (containers)."""
    total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = _sysctl_int("hw.memsize") or 0
    limit = _cgroup_memory_limit()
    return min(total, limit) if total and limit else total


def _cgroup_memory_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" or a huge number mean no limit
            return int(text)
    return None


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _run(command: list[str]) -> str:
    if not shutil.which(command[0]):
        return ""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _sysctl_text(key: str) -> str:
    return _run(["sysctl", "-n", key]) if platform.system() == "Darwin" else ""


def _sysctl_int(key: str) -> int | None:
    text = _sysctl_text(key)
    return int(text) if text.isdigit() else None


def _nvidia_smi() -> tuple[str, int | None]:
    """(name, memory in bytes) of the first NVIDIA card, ("", None) without one."""
    text = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
    if not text:
        return "", None
    name, _, mebibytes = text.splitlines()[0].rpartition(",")
    try:
        return name.strip(), int(float(mebibytes)) * 2**20
    except ValueError:
        return text.splitlines()[0].strip(), None
