"""Start-up in seconds: plans loaded or calibrated in the background, signals heard at any moment,
a taken port refused at once, and several workers that act as one service."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from app.registry import Registry
from app.settings import usable_cores
from engine import plan as plans
from tests.conftest import build_models_dir, jpeg_bytes
from tests.live import ROOT, LiveServer
from tests.test_api import make_client, wait_ready

IMAGE = {"files": ("a.jpg", jpeg_bytes((10, 20, 30)))}


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return build_models_dir(tmp_path / "models")


def _shipped_plan(models_dir: Path, threads: int, p50_ms: float, check_ms: float | None = None) -> dict:
    """A plan in models/plans as prune-bench plan writes it, with figures no machine would measure, but
    at the start-up speed check's point (batch 8, 1 view): there ``check_ms``, else this machine's fastest pass."""
    registry = Registry(models_dir, "fp32", probe_runs=3)
    registry.load_models()
    if check_ms is None:  # at the plan's threads (its key names them), not at this process's count (conftest: 2)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            latency = registry.measure(registry.variants[0], runs=5, tta=plans.CHECK_TTA)
        finally:
            torch.set_num_threads(before)
        check_ms = latency[plans.CHECK_BATCH]["min_ms"]
    key = plans.plan_key("fp32", threads)
    plan = plans.new_plan(key, "test", 1, 0)
    for variant in registry.variants:
        variant.latency_by_tta = {level: {b: {"p50_ms": p50_ms, "p95_ms": p50_ms * 2, "images_per_s": b / p50_ms * 1e3}
                                          for b in (1, 8, 64)} for level in (0, 1, 2)}
        variant.latency_by_tta[plans.CHECK_TTA][plans.CHECK_BATCH] |= {"p50_ms": check_ms, "min_ms": check_ms}
        variant.latency = variant.latency_by_tta[0]
        plan["variants"][variant.name] = registry.plan_entry(variant)
    plans.write(models_dir / "plans" / plans.plan_filename(key), plan)
    return plan


def test_a_matching_plan_is_used_and_a_changed_variant_is_measured(models_dir: Path, tmp_path: Path) -> None:
    plan = _shipped_plan(models_dir, threads=1, p50_ms=123.5)
    plan["variants"]["gate-keep0.10"]["sha256"] = "0" * 64  # as if the checkpoint changed since
    plans.write(models_dir / "plans" / plans.plan_filename(plan["key"]), plan)
    with make_client(models_dir, torch_threads=1, plan_dir=tmp_path / "cache") as c:
        wait_ready(c)
        table = c.get("/variants").json()
    rows = {row["name"]: row for row in table["variants"]}
    assert table["execution"]["status"] == "done" and table["execution"]["key"] == plan["key"]
    for name in ("dense", "gate-keep0.50", "channel-keep0.50"):
        assert rows[name]["latency"]["batch_64"]["p50_ms"] == 123.5
    assert rows["gate-keep0.10"]["latency"]["batch_64"]["p50_ms"] != 123.5  # measured here instead
    # What was measured is stored with the rest in the cache, and every row names that plan.
    cached = plans.read(tmp_path / "cache" / plans.plan_filename(plan["key"]))
    assert set(cached["variants"]) == set(rows)
    assert all(row["latency_source"].startswith("plan: ") for row in rows.values())
    [check] = table["execution"]["plan_checks"]
    assert check["fits"] and check["variant"] == "dense" and check["plan"].endswith(plans.plan_filename(plan["key"]))


def test_a_plan_whose_figures_do_not_hold_here_is_measured_again_once(models_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The same key, but the check point ran 100x slower where the plan was made (another machine, same name).
    shipped = _shipped_plan(models_dir, threads=1, p50_ms=123.5, check_ms=123.5)
    cache = tmp_path / "cache"
    with make_client(models_dir, torch_threads=1, plan_dir=cache) as c:
        wait_ready(c)
        table = c.get("/variants").json()
    [check] = table["execution"]["plan_checks"]
    assert not check["fits"] and check["plan_ms"] == 123.5 and check["here_ms"] < 123.5 - plans.SLACK_MS
    assert table["execution"]["plan"] == str(cache / plans.plan_filename(shipped["key"]))  # measured, stored
    assert all(row["latency"]["batch_64"]["p50_ms"] != 123.5 for row in table["variants"])
    # The next start checks the shipped plan again (it may have been replaced), then uses the one measured
    # here without calibrating.
    from app import registry as registry_module

    def no_calibration(*_args, **_kwargs):
        raise AssertionError("calibrated although the plan measured here matched")

    monkeypatch.setattr(registry_module, "calibrate", no_calibration)
    with make_client(models_dir, torch_threads=1, plan_dir=cache) as c:
        wait_ready(c)
        again = c.get("/variants").json()
    assert [c["fits"] for c in again["execution"]["plan_checks"]] == [False, True]
    assert again["execution"]["plan"] == table["execution"]["plan"]


def test_prune_serve_check_says_when_a_plan_does_not_fit(models_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    from app.cli import main

    _shipped_plan(models_dir, threads=1, p50_ms=123.5, check_ms=123.5)
    for name, value in (("TORCH_THREADS", "1"), ("PRECISION", "fp32"), ("PLAN_DIR", str(tmp_path / "cache"))):
        monkeypatch.setenv(name, value)
    assert main(["--check", "--models-dir", str(models_dir)]) == 0
    out = capsys.readouterr().out
    assert "does not fit this machine" in out and "measurement now" in out


def test_ready_at_once_then_each_variant_switches_in_the_background(models_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    original = Registry.optimise

    def slow_optimise(self, variant, entry=None, source=""):  # noqa: ANN001, ANN202
        if variant.name == "gate-keep0.10":
            release.wait(20)
        return original(self, variant, entry, source)

    monkeypatch.setattr(Registry, "optimise", slow_optimise)
    cache = tmp_path / "cache"
    with make_client(models_dir, torch_threads=1, plan_dir=cache) as c:
        state = wait_ready(c, optimised=False)
        # Ready before any figure exists: still on the dense paths, looking for a plan, or calibrating (the
        # empty cache holds no plan, and no other worker holds its lock).
        assert state["ready"] is True and state["execution"] in ("dense", "checking plan", "calibrating")
        # Served meanwhile, on the compact dense path; the unmeasured variant says so.
        assert c.post("/predict?keep=0.1", files=IMAGE).status_code == 200
        row = next(r for r in c.get("/variants").json()["variants"] if r["name"] == "gate-keep0.10")
        assert row["latency"] == {} and row["latency_source"] is None
        unmeasured = c.post("/predict?keep=auto&max_latency_ms=1000", files=IMAGE).json()
        assert unmeasured["latency_budget_met"] is None and unmeasured["estimated_ms"] is None  # not known yet
        release.set()
        wait_ready(c)
        rows = c.get("/variants").json()["variants"]
        assert all(r["latency"]["batch_64"]["p50_ms"] > 0 for r in rows)
    monkeypatch.setattr(Registry, "optimise", original)
    # The next start finds the plan this one measured: no calibration at all.
    from app import registry as registry_module

    def no_calibration(*_args, **_kwargs):
        raise AssertionError("calibrated although a plan matched")

    monkeypatch.setattr(registry_module, "calibrate", no_calibration)
    with make_client(models_dir, torch_threads=1, plan_dir=cache) as c:
        wait_ready(c)
        again = {r["name"]: r["latency"] for r in c.get("/variants").json()["variants"]}
    assert again == {r["name"]: r["latency"] for r in rows}


def test_sigterm_during_calibration_exits_within_3_seconds(models_dir: Path, tmp_path: Path) -> None:
    # A huge probe count keeps the service calibrating: the signal must not wait for it.
    server = LiveServer(models_dir, LATENCY_PROBE_RUNS="1000000", PLAN_DIR=str(tmp_path / "cache"))
    try:
        state = server.wait_ready(execution="calibrating")
        assert state["ready"] is True
        began = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(10)
        took = time.monotonic() - began
    finally:
        server.stop()
    assert took < 3.0, (took, server.output())
    assert code in (0, -signal.SIGTERM)


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.5])
def test_sigint_while_starting_exits_within_3_seconds(models_dir: Path, tmp_path: Path, delay: float) -> None:
    server = LiveServer(models_dir, LATENCY_PROBE_RUNS="1000000", PLAN_DIR=str(tmp_path / "cache"))
    try:
        time.sleep(delay)  # imports, loading or calibration: whatever it is doing then
        began = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        server.process.wait(10)
        took = time.monotonic() - began
    finally:
        server.stop()
    assert took < 3.0, (took, server.output())


def test_a_taken_port_exits_non_zero_at_once_with_a_clear_message(models_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        began = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "app.cli", "--port", str(port), "--models-dir", str(models_dir)],
                              cwd=ROOT, capture_output=True, text=True, timeout=30)
        took = time.monotonic() - began
    assert done.returncode != 0 and took < 5.0
    assert f"port {port}" in done.stderr and "already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_two_workers_are_one_service(models_dir: Path, tmp_path: Path) -> None:
    server = LiveServer(models_dir, "--workers", "2", PLAN_DIR=str(tmp_path / "cache"), TORCH_THREADS="0")
    try:
        server.wait_ready(timeout=90, execution="done")
        pids, tables = set(), {}
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:  # new connections land on either worker
            with httpx.Client(base_url=server.url, timeout=10) as c:
                state = c.get("/ready").json()
                if state["execution"] != "done":
                    continue
            with httpx.Client(base_url=server.url, timeout=10) as c:
                pid_again = c.get("/metrics.json").json()["worker_pid"]
                table = c.get("/variants").json()
            pids.add(pid_again)
            tables[pid_again] = (table["variants"], table["execution"]["threads"], table["execution"]["status"])
        assert len(pids) == 2, "both workers should have answered"
        (rows_a, threads_a, status_a), (rows_b, threads_b, status_b) = tables.values()
        if status_a == status_b == "done":
            assert rows_a == rows_b  # the same plan, the same figures
        assert threads_a == threads_b == max(1, usable_cores() // 2)  # cores shared by the workers
        sent = 0
        totals = []
        for _ in range(6):
            for _ in range(5):
                with httpx.Client(base_url=server.url, timeout=30) as c:
                    assert c.post("/predict?keep=0.5", files=IMAGE).status_code == 200
                sent += 1
            with httpx.Client(base_url=server.url, timeout=10) as c:
                families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
            total = sum(s.value for s in families["prune_requests"].samples
                        if s.name == "prune_requests_total" and s.labels["variant"] == "gate-keep0.50")
            totals.append(total)
        assert totals == [5, 10, 15, 20, 25, 30], totals  # summed over workers, whoever answers the scrape
        images = sum(s.value for s in families["prune_images"].samples if s.name == "prune_images_total")
        assert images == sent
    finally:
        server.stop()
    log = server.output()
    assert "Traceback" not in log, log


def test_check_uses_a_matching_plan(models_dir: Path, tmp_path: Path) -> None:
    _shipped_plan(models_dir, threads=2, p50_ms=77.0)
    done = subprocess.run([sys.executable, "-m", "app.cli", "--check", "--models-dir", str(models_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PRECISION": "fp32", "TORCH_THREADS": "2",
                               "PRUNE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "batch-1 p50 77.00 ms" in done.stdout and "plans/plan-" in done.stdout
    assert json.loads((models_dir / "manifest.json").read_text())["variants"]
