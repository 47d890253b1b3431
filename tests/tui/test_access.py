"""Model access and download against a local stub of the Hugging Face hub (tests/tui/hub_stub.py).

The stub serves the tiny model as FLUX.1-dev (gated) and FLUX.1-schnell (open),
so the same code paths as the real ~34 GB download run in a second.
"""
from __future__ import annotations

import socket

import pytest
from textual.widgets import Input, Static

from tests.tui.hub_stub import HubStub, StubRepo, point_huggingface_hub_at
from tests.tui.run_helpers import scripted_factory
from tests.tui.setup_helpers import FIXED_MACHINE, wait_for_screen, wait_until
from tui.app import WizardApp
from tui.state import WizardState

DEV = "black-forest-labs/FLUX.1-dev"
SCHNELL = "black-forest-labs/FLUX.1-schnell"
GOOD_TOKEN = "hf_stub_token_that_was_accepted"
SIZE = (100, 30)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def tiny_folder():
    from engine.flux.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture
def hub(tiny_folder, tmp_path, monkeypatch):
    stub = HubStub({DEV: StubRepo(tiny_folder, gated=True), SCHNELL: StubRepo(tiny_folder)},
                   accepted_tokens={GOOD_TOKEN})
    with stub:
        point_huggingface_hub_at(monkeypatch, stub.endpoint, tmp_path / "hf")
        yield stub


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- the engine against the stub


def test_schnell_downloads_from_the_hub_into_the_cache_and_loads(hub, tiny_folder, tmp_path):
    import json

    from engine.flux.hub import check_access, resolve_model_path
    from engine.flux.loading import load_model

    assert check_access("schnell") == "ok"
    progress: list[tuple[int, int | None]] = []
    folder = resolve_model_path("schnell", progress=lambda done, total: progress.append((done, total)))
    assert folder.is_relative_to(tmp_path / "hf" / "hub")
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (folder / "flux1-schnell.safetensors").exists()
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert progress and max(done for done, _ in progress) == total
    assert any(path.startswith("/cdn/") for _, path in hub.requests)  # LFS files came through the redirect
    model = load_model(str(folder))
    served = json.loads((tiny_folder / "transformer" / "config.json").read_text())
    assert model.transformer_config["num_layers"] == served["num_layers"]
    assert check_access("schnell") == "cached"


def test_an_interrupted_download_resumes_where_it_stopped(tiny_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from engine.flux.hub import resolve_model_path

    # small chunks, so the bytes before the cut are on disk when the connection drops (as with real sizes)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # huggingface_hub waits 1 s before resuming
    with HubStub({SCHNELL: StubRepo(tiny_folder)}, cut_after_bytes=4096) as stub:
        point_huggingface_hub_at(monkeypatch, stub.endpoint, tmp_path / "hf")
        folder = resolve_model_path("schnell")
    assert ("transformer/diffusion_pytorch_model.safetensors", "bytes=4096-") in stub.range_requests
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    assert weights.read_bytes() == (tiny_folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_gated_repo_says_to_accept_the_license_and_log_in(hub):
    from engine.errors import ModelAccessError
    from engine.flux.hub import check_access, resolve_model_path

    assert check_access("dev") == "gated"
    with pytest.raises(ModelAccessError) as raised:
        resolve_model_path("dev")
    text = str(raised.value)
    assert "accept the license" in text and f"https://huggingface.co/{DEV}" in text
    assert "hf auth login" in text


def test_login_with_huggingface_hub_opens_the_gated_repo(hub, tmp_path):
    from huggingface_hub import login

    from engine.flux.hub import check_access

    with pytest.raises(Exception):
        login(token="hf_wrong")
    login(token=GOOD_TOKEN)
    assert (tmp_path / "hf" / "token").read_text().strip() == GOOD_TOKEN  # stored by huggingface_hub itself
    assert check_access("dev") == "ok"


def test_missing_repo_is_named_in_the_message(hub):
    from engine.errors import ModelAccessError
    from engine.flux.hub import check_access, resolve_model_path

    assert check_access("someone/no-such-model") == "missing"
    with pytest.raises(ModelAccessError, match="no Hugging Face repo 'someone/no-such-model'"):
        resolve_model_path("someone/no-such-model")


def test_no_network_check_access_answers_offline(tmp_path, monkeypatch):
    from engine.flux.hub import check_access

    point_huggingface_hub_at(monkeypatch, f"http://127.0.0.1:{unused_port()}", tmp_path / "hf")
    assert check_access("schnell") == "offline"


def test_no_network_download_gives_a_clear_message(tmp_path, monkeypatch):
    from engine.errors import ModelAccessError
    from engine.flux.hub import resolve_model_path

    point_huggingface_hub_at(monkeypatch, f"http://127.0.0.1:{unused_port()}", tmp_path / "hf")
    with pytest.raises(ModelAccessError) as raised:
        resolve_model_path("schnell")
    assert "internet connection" in str(raised.value) and "resumes" in str(raised.value)


def test_download_meter_speed_and_time_left():
    from tui.screens.access import DownloadMeter, describe_download

    meter = DownloadMeter(window_s=10)
    for second in range(5):
        meter.add(second * 2_000_000, now=100.0 + second)
    assert meter.bytes_per_s == pytest.approx(2_000_000)
    assert meter.seconds_left(8_000_000, 20_000_000) == pytest.approx(6.0)
    text = describe_download(8_000_000, 20_000_000, meter.bytes_per_s, 6.0)
    assert text == "8.00 MB of 20.00 MB · 2.00 MB/s · about 6s left"
    meter.add(100_000_000, now=200.0)  # old samples leave the window
    assert len(meter.samples) == 2


# ---------------------------------------------------------------- the Access screen


def access_app(model: str, monkeypatch) -> WizardApp:
    from tui.screens import train

    # the Train screen that follows plays a scripted run: these tests are about access
    monkeypatch.setattr(train, "build_trainer", scripted_factory([], wait=False))
    return WizardApp(state=WizardState(model=model), start="access", machine=FIXED_MACHINE)


def status_text(app) -> str:
    return str(app.screen.query_one("#access-status", Static).render())


@pytest.mark.anyio
async def test_access_screen_downloads_an_open_model_then_trains(hub, tiny_folder, monkeypatch):
    from tui.screens import access

    shown = []

    def recording_describe(*args):
        shown.append(describe(*args))
        return shown[-1]

    describe = access.describe_download
    monkeypatch.setattr(access, "describe_download", recording_describe)
    app = access_app("schnell", monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_screen(pilot, "AccessScreen")
        await wait_for_screen(pilot, "TrainScreen", timeout=60)
    total = access.format_bytes(sum(p.stat().st_size for p in tiny_folder.rglob("*") if p.is_file()))
    assert shown and all(" of " in text for text in shown), shown
    assert shown[-1].startswith(f"{total} of {total}"), shown


@pytest.mark.anyio
async def test_access_screen_gated_takes_a_token_through_huggingface_hub_login(hub, tmp_path, monkeypatch):
    app = access_app("dev", monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "gated" in status_text(app), 30, "gated message")
        steps = str(app.screen.query_one("#access-login-steps", Static).render())
        assert f"https://huggingface.co/{DEV}" in steps and "accept the license" in steps
        field = app.screen.query_one("#access-token", Input)
        assert field.password and app.screen.query_one("#access-login").display

        field.value = "hf_wrong"
        await pilot.press("enter")
        await wait_until(pilot, lambda: "refused" in str(app.screen.query_one("#access-login-error").render()),
                         30, "refused token")
        assert field.value == "" and not (tmp_path / "hf" / "token").exists()

        field.value = GOOD_TOKEN
        await pilot.press("enter")
        await wait_for_screen(pilot, "TrainScreen", timeout=60)
    assert (tmp_path / "hf" / "token").read_text().strip() == GOOD_TOKEN


@pytest.mark.anyio
async def test_access_screen_missing_repo(hub, monkeypatch):
    app = access_app("someone/no-such-model", monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "has no repo someone/no-such-model" in status_text(app), 30, "missing")
        assert type(app.screen).__name__ == "AccessScreen"


@pytest.mark.anyio
async def test_access_screen_offline_says_so_and_r_checks_again(tmp_path, monkeypatch):
    point_huggingface_hub_at(monkeypatch, f"http://127.0.0.1:{unused_port()}", tmp_path / "hf")
    app = access_app("schnell", monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "cannot be reached" in status_text(app), 30, "offline message")
        await pilot.press("r")
        await wait_until(pilot, lambda: "cannot be reached" in status_text(app), 30, "offline again")
        assert not app.screen.query_one("#access-login").display


@pytest.mark.anyio
async def test_access_screen_skips_the_tiny_model_and_cached_models(hub, monkeypatch):
    from engine.flux.hub import resolve_model_path

    app = access_app("tiny", monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_screen(pilot, "TrainScreen")
    resolve_model_path("schnell")  # now in the cache
    requests_before = len(hub.requests)
    app = access_app("schnell", monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for_screen(pilot, "TrainScreen")
    assert not [path for _, path in hub.requests[requests_before:] if "/resolve/" in path]
