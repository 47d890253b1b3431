"""Machine detection: real on this box, faked for Apple Silicon, CUDA and broken probes."""
from types import SimpleNamespace

import pytest

from engine import machine
from engine.machine import GIB, MachineInfo, detect_machine


def fake_mlx(metal=False, cuda=False, info=None, broken=False):
    def device_info(device=None):
        if broken:
            raise RuntimeError("no device")
        return dict(info or {})

    def available():
        if broken:
            raise RuntimeError("no backend")
        return False

    return SimpleNamespace(
        metal=SimpleNamespace(is_available=(lambda: metal) if not broken else available, device_info=device_info),
        cuda=SimpleNamespace(is_available=(lambda: cuda) if not broken else available),
        device_info=device_info, gpu="gpu", cpu="cpu",
    )


@pytest.fixture
def no_nvidia_smi(monkeypatch):
    monkeypatch.setattr(machine, "_nvidia_smi", lambda: ("", None))


def test_this_machine_has_positive_memory():
    found = detect_machine()
    assert found.kind in ("apple", "cuda", "cpu")
    assert found.name
    assert found.total_memory > 0
    assert 0 < found.available_for_training <= found.total_memory
    assert found.to_dict()["kind"] == found.kind


def test_apple_uses_metals_recommended_working_set(monkeypatch, no_nvidia_smi):
    info = {"memory_size": 32 * GIB, "max_recommended_working_set_size": 22 * GIB, "device_name": "Apple M2 Pro"}
    monkeypatch.setattr(machine, "_import_mlx", lambda: fake_mlx(metal=True, info=info))
    found = detect_machine()
    assert (found.kind, found.total_memory, found.available_for_training) == ("apple", 32 * GIB, 22 * GIB)
    assert found.name  # sysctl on a Mac, MLX's device name elsewhere
    assert found.compute_dtype_bytes == 2


def test_apple_without_a_working_set_lends_three_quarters(monkeypatch, no_nvidia_smi):
    monkeypatch.setattr(machine, "_import_mlx", lambda: fake_mlx(metal=True, info={"memory_size": 16 * GIB}))
    assert detect_machine().available_for_training == 12 * GIB


def test_cuda_plans_with_the_cards_free_memory(monkeypatch, no_nvidia_smi):
    info = {"device_name": "NVIDIA H100", "total_memory": 80 * GIB, "free_memory": 60 * GIB}
    monkeypatch.setattr(machine, "_import_mlx", lambda: fake_mlx(cuda=True, info=info))
    found = detect_machine()
    assert (found.kind, found.name, found.total_memory) == ("cuda", "NVIDIA H100", 80 * GIB)
    assert found.available_for_training == 60 * GIB
    info["free_memory"] = 80 * GIB
    assert detect_machine().available_for_training == int(80 * GIB * machine.CUDA_TRAINING_FRACTION)


def test_broken_probes_fall_back_to_the_cpu(monkeypatch, no_nvidia_smi):
    monkeypatch.setattr(machine, "_import_mlx", lambda: fake_mlx(broken=True))
    found = detect_machine()
    assert found.kind == "cpu" and found.total_memory > 0 and found.compute_dtype_bytes == 4


def test_without_mlx_the_cpu_is_still_described(monkeypatch, no_nvidia_smi):
    monkeypatch.setattr(machine, "_import_mlx", lambda: None)
    found = detect_machine()
    assert found.kind == "cpu" and found.name and found.available_for_training > 0


def test_an_nvidia_card_mlx_cannot_use_is_noted(monkeypatch):
    monkeypatch.setattr(machine, "_import_mlx", lambda: fake_mlx())
    monkeypatch.setattr(machine, "_nvidia_smi", lambda: ("NVIDIA RTX 4090", 24 * GIB))
    found = detect_machine()
    assert found.kind == "cpu" and "NVIDIA RTX 4090" in found.notes[0]


def test_nvidia_smi_absent_answers_nothing(monkeypatch):
    monkeypatch.setattr(machine.shutil, "which", lambda name: None)
    assert machine._nvidia_smi() == ("", None)


def test_cpu_keeps_room_for_the_system():
    info = MachineInfo("cpu", "x", 0, 0)
    assert info.compute_dtype_bytes == 4
    found = machine._probe_cpu(None)
    reserved = found.total_memory - found.available_for_training
    assert reserved >= machine.CPU_RESERVED_MINIMUM or found.available_for_training == 0
