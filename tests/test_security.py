"""Optional API keys, request timeouts and the open-port warning."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from app.security import is_loopback, key_matches, warn_if_open
from app.settings import Settings
from tests.conftest import build_models_dir, jpeg_bytes
from tests.test_api import make_client, wait_ready

KEY = "k3y-for-tests-0123456789"
IMAGE = {"files": ("a.jpg", jpeg_bytes((1, 2, 3)))}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models_dir(tmp_path_factory.mktemp("security") / "models")


def test_without_keys_everything_is_open(models_dir: Path) -> None:
    with make_client(models_dir) as c:
        wait_ready(c, optimised=False)
        assert c.post("/predict", files=IMAGE).status_code == 200
        assert c.get("/metrics").status_code == 200


@pytest.mark.parametrize("metrics_require_key", [True, False])
def test_keys_guard_every_route_but_health_and_ready(models_dir: Path, metrics_require_key: bool) -> None:
    with make_client(models_dir, api_keys=f"other-key-abcdefghijkl,{KEY}",
                     metrics_require_key=metrics_require_key) as c:
        assert c.get("/health").status_code == 200
        wait_ready(c, optimised=False)  # /ready needs no key either
        for method, path in (("POST", "/predict"), ("GET", "/variants"), ("GET", "/variants/plot")):
            r = c.request(method, path, files=IMAGE if method == "POST" else None)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert "API key" in r.json()["detail"]
        wrong = c.post("/predict", files=IMAGE, headers={"Authorization": "Bearer not-the-key-at-all"})
        assert wrong.status_code == 401 and wrong.json()["detail"] == "invalid API key"
        basic = c.post("/predict", files=IMAGE, headers={"Authorization": f"Basic {KEY}"})
        assert basic.status_code == 401
        good = c.post("/predict", files=IMAGE, headers={"Authorization": f"Bearer {KEY}"})
        assert good.status_code == 200
        assert c.get("/variants", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
        assert c.get("/metrics").status_code == (401 if metrics_require_key else 200)
        assert c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_keys_are_comma_separated_and_long_enough() -> None:
    assert Settings(api_keys=f" {KEY} , other-key-abcdefghijkl ").api_keys == [KEY, "other-key-abcdefghijkl"]
    with pytest.raises(ValueError, match="at least 16"):
        Settings(api_keys="short")
    assert key_matches(KEY, ["x" * 16, KEY]) and not key_matches(KEY[:-1], [KEY])


def test_listening_beyond_loopback_without_keys_warns(caplog: pytest.LogCaptureFixture) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
    with caplog.at_level(logging.WARNING, logger="app.security"):
        assert warn_if_open("0.0.0.0", []) is True
        assert warn_if_open("0.0.0.0", [KEY]) is False
        assert warn_if_open("127.0.0.1", []) is False
    assert "without API keys" in caplog.text


def test_a_request_past_the_timeout_gets_504(models_dir: Path) -> None:
    async def scenario() -> httpx.Response:
        app = create_app(Settings(models_dir=models_dir, precision="fp32", latency_probe_runs=3,
                                  request_timeout_s=0.3))
        async with app.router.lifespan_context(app):
            service = app.state.service
            await service.wait_loaded()
            forward = service.registry.forward
            service.registry.forward = lambda v, x, *a: (__import__("time").sleep(1.0), forward(v, x, *a))[1]
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                r = await c.post("/predict", files=IMAGE)
                service.registry.forward = forward
                await asyncio.sleep(1.0)  # the dropped batch finishes; the service serves again
                again = await c.post("/predict", files=IMAGE)
        assert again.status_code == 200
        return r

    r = asyncio.run(scenario())
    assert r.status_code == 504 and "REQUEST_TIMEOUT_S=0.3" in r.json()["detail"]


def test_uvicorn_gets_the_admission_and_shutdown_limits(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app import cli
    from tests.live import free_port

    seen: dict = {}
    monkeypatch.setattr(cli.uvicorn, "run", lambda *args, **kwargs: seen.update(kwargs))
    for key in ("MODELS_DIR", "HOST", "PORT", "WORKERS"):  # main() passes flags on through these: restore after
        monkeypatch.setenv(key, os.environ[key]) if key in os.environ else monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LIMIT_CONCURRENCY", "7")
    monkeypatch.setenv("SHUTDOWN_GRACE_S", "3")
    assert cli.main(["--port", str(free_port()), "--models-dir", str(models_dir)]) == 0
    assert seen["limit_concurrency"] == 7 and seen["timeout_graceful_shutdown"] == 3 and seen["workers"] == 1
