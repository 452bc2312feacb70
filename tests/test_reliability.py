"""Faults, signals, disconnects and hostile input, against a real `prune-serve` process where it matters."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from app.cli import main as prune_serve
from tests.conftest import build_models_dir, jpeg_bytes
from tests.live import ROOT, LiveServer


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return build_models_dir(tmp_path / "models")


def _files(count: int, shade: int = 0) -> list:
    return [("files", (f"{i}.jpg", jpeg_bytes(((shade + 7 * i) % 255, 90, 30)), "image/jpeg")) for i in range(count)]


async def _post_many(url: str, count: int, images: int = 2) -> list:
    async with httpx.AsyncClient(timeout=60) as client:
        async def one(i: int):
            try:
                return await client.post(f"{url}/predict", files=_files(images, shade=i))
            except httpx.HTTPError as exc:
                return exc
        return await asyncio.gather(*[one(i) for i in range(count)])


def test_sigterm_under_load_finishes_every_accepted_request(models_dir: Path) -> None:
    # A long batching window keeps requests in flight when the signal arrives.
    server = LiveServer(models_dir, MAX_WAIT_MS="400", MAX_BATCH="256")
    try:
        server.wait_ready()

        async def scenario() -> list:
            requests = asyncio.ensure_future(_post_many(server.url, 24))
            await asyncio.sleep(0.25)  # every request is sent and waiting in the batcher
            server.process.send_signal(signal.SIGTERM)
            return await requests

        results = asyncio.run(scenario())
        # uvicorn shuts down gracefully, then re-raises the signal so supervisors see why it exited.
        assert server.process.wait(30) in (0, -signal.SIGTERM)
        log = server.output()
    finally:
        server.stop()
    statuses = [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in results]
    assert statuses == [200] * 24, (statuses, log[-4000:])
    assert all(len(r.json()["predictions"]) == 2 for r in results)
    assert "Shutting down" in log and "Finished server process" in log


def test_client_gone_mid_upload_or_mid_batch_does_not_hurt_the_others(models_dir: Path) -> None:
    server = LiveServer(models_dir, MAX_WAIT_MS="300")
    try:
        server.wait_ready()
        # 1. A client announces a large multipart body, sends part of it and vanishes.
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                        b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"files\"; "
                        b"filename=\"a.jpg\"\r\n\r\n" + jpeg_bytes((1, 2, 3))[:200])

        # 2. In the same batching window: one client gives up (timeout) while another waits.
        async def scenario() -> tuple:
            async with httpx.AsyncClient(timeout=60) as patient, httpx.AsyncClient(timeout=0.1) as impatient:
                async def give_up():
                    try:
                        return await impatient.post(f"{server.url}/predict", files=_files(3))
                    except httpx.TimeoutException as exc:
                        return exc
                return await asyncio.gather(give_up(), patient.post(f"{server.url}/predict", files=_files(2, 50)))

        gone, kept = asyncio.run(scenario())
        assert isinstance(gone, httpx.TimeoutException)
        assert kept.status_code == 200 and len(kept.json()["predictions"]) == 2
        alone = httpx.post(f"{server.url}/predict", files=_files(2, 50), timeout=60)
        assert alone.json()["predictions"] == kept.json()["predictions"]  # the shared batch was not disturbed
        assert httpx.get(f"{server.url}/ready").status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize("fault", ["does-not-exist", "not-a-directory", "unreadable", "names-missing-file"])
def test_unusable_models_dir_is_named_and_check_exits_non_zero(tmp_path: Path, models_dir: Path, fault: str,
                                                              capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    target = models_dir
    if fault == "does-not-exist":
        target, expected = tmp_path / "nowhere", "does not exist"
    elif fault == "not-a-directory":
        target = tmp_path / "file"
        target.write_text("x")
        expected = "not a directory"
    elif fault == "unreadable":
        models_dir.chmod(0)
        if os.geteuid() == 0:  # root reads any directory (CI runs as root): the OS's answer for anyone else
            import app.registry

            real_access = os.access
            monkeypatch.setattr(app.registry.os, "access", lambda path, mode: False if Path(path) == models_dir
                                else real_access(path, mode))
        expected = "not readable"
    else:
        manifest = (models_dir / "manifest.json").read_text()
        (models_dir / "manifest.json").write_text(manifest.replace("gate-keep0.10.safetensors", "gone.safetensors"))
        expected = "gone.safetensors: file is missing"
    try:
        assert prune_serve(["--check", "--models-dir", str(target)]) == 1
    finally:
        models_dir.chmod(0o755)
    assert expected in capsys.readouterr().err


def test_upload_names_never_reach_the_filesystem(models_dir: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    hostile = "../../../../tmp/owned-by-client.jpg"
    before = set(Path("/tmp").iterdir())
    with TestClient(create_app(Settings(models_dir=models_dir, precision="fp32", latency_probe_runs=3))) as c:
        deadline = time.time() + 30
        while c.get("/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        big = jpeg_bytes((5, 5, 5), size=(1500, 1500))  # large enough to be spooled by the form parser
        r = c.post("/predict", files=[("files", (hostile, big, "image/jpeg"))])
        assert r.status_code == 200 and r.json()["predictions"][0]["file"] == hostile  # echoed, never used as a path
    assert not Path("/tmp/owned-by-client.jpg").exists()
    assert not any("owned-by-client" in p.name for p in set(Path("/tmp").iterdir()) - before)


def test_internal_errors_never_echo_a_traceback(models_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(models_dir=models_dir, precision="fp32", latency_probe_runs=3))
    with TestClient(app, raise_server_exceptions=False) as c:
        deadline = time.time() + 30
        while c.get("/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)

        def explode(*_args, **_kwargs):
            raise RuntimeError("secret internal detail /srv/app/weights.py line 42")

        app.state.service.registry.forward = explode
        r = c.post("/predict", files=_files(1))
        assert r.status_code == 500
        assert r.json() == {"detail": "internal error; the server logged the details"}
        assert "secret" not in r.text and "Traceback" not in r.text
        assert c.get("/health").status_code == 200


def test_no_pickle_loading_anywhere() -> None:
    """Checkpoints are safetensors; torch.load only with weights_only=True; pickle only through the
    numpy-only unpickler that reads torchvision's CIFAR-10 batches."""
    sources = [p for folder in ("training", "app", "bench") for p in (ROOT / folder).rglob("*.py")]
    assert sources
    for path in sources:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        if path.name != "data.py":
            assert not re.search(r"^\s*(import|from)\s+(pickle|dill|joblib|cloudpickle)\b", text, re.M), path
    data = (ROOT / "training" / "data.py").read_text()
    assert "class _NumpyOnlyUnpickler(pickle.Unpickler)" in data and "pickle.load(" not in data


def test_check_with_a_malformed_manifest_prints_one_line_and_exits_1(models_dir: Path) -> None:
    """Run as an operator would: a separate process, stderr read whole. No traceback, one line."""
    import json
    import subprocess
    import sys

    manifest = json.loads((models_dir / "manifest.json").read_text())
    manifest["variants"][0]["keep"] = "half"
    (models_dir / "manifest.json").write_text(json.dumps(manifest))
    done = subprocess.run([sys.executable, "-m", "app.cli", "--check", "--models-dir", str(models_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prune-serve: ") and "variants.0.keep" in lines[0]
    assert "'half'" in lines[0]


def test_bad_settings_exit_2_with_one_line(models_dir: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "app.cli", "--check", "--models-dir", str(models_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "QUEUE_SIZE": "4", "MAX_IMAGES": "64"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "QUEUE_SIZE=4 is below MAX_IMAGES=64" in done.stderr
