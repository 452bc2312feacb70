"""The benchmark commands run end to end on tiny models (their numbers are not asserted: benchmarks
are not tests; that they run, and report what they measured, is)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main as prune_bench
from tests.conftest import build_models_dir


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return build_models_dir(tmp_path / "models")


def test_speed_reports_every_variant_against_dense_and_onnx_runtime(models_dir: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "speed.json"
    assert prune_bench(["speed", "--models-dir", str(models_dir), "--repeats", "1", "--seconds", "0.01",
                        "--threads", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [row["name"] for row in result["variants"]] == ["dense", "gate-keep0.50", "gate-keep0.10",
                                                          "channel-keep0.50"]
    for row in result["variants"]:
        assert row["max_abs_diff"] < 1e-4  # the execution path equals the masked model
        assert set(row["images_per_s"]) == {"1", "8", "64"} and row["vs_onnx"] is not None
        assert f"| {row['name']} |" in text
    assert result["service_rss_bytes"] > 0
    assert "Goals (this run" in text and "ONNX Runtime" in text and "service dense" in text


def test_load_soak_and_overload_pass_on_a_tiny_service(models_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.live import free_port

    assert prune_bench(["load", "--models-dir", str(models_dir), "--requests", "120", "--clients", "8",
                        "--overload-seconds", "2", "--overload-clients", "24", "--overload-queue-size", "8",
                        "--warmup", "40",
                        "--port", str(free_port()), "--ready-timeout", "60"]) == 0
    text = capsys.readouterr().out
    assert "120 of 120 requests" in text and "errors: 0" in text and "recovered: True" in text
    assert "PASS" in text


def test_load_refuses_a_non_loopback_target(capsys: pytest.CaptureFixture) -> None:
    assert prune_bench(["load", "--url", "http://example.com:8000"]) == 2
    assert "loopback" in capsys.readouterr().err


def test_http_bench_compares_variants_and_configurations(models_dir: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    from tests.live import free_port

    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (.ci/run installs it)")
    assert prune_bench(["http", "--models-dir", str(models_dir), "--variants", "gate-keep0.10", "--clients", "2",
                        "--images", "1", "--max-batch", "1", "8", "--seconds", "1", "--warmup", "1",
                        "--tta", "0", "1", "--port", str(free_port())]) == 0
    text = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 8  # 2 variants (dense added) × 2 TTA levels × 2 server configurations
    assert {(row[2], row[3]) for row in rows} == {(v, t) for v in ("dense", "gate-keep0.10") for t in ("0", "1")}
    dense_served = next(row for row in rows if row[:4] == ["1", "1", "dense", "0"])  # the test manifest serves 0
    assert dense_served[7:9] == ["1.00", "1.00"]  # ×dense is against it, as is ×first config


def test_failover_behind_haproxy_loses_no_request(models_dir: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (.ci/run installs it)")
    assert prune_bench(["failover", "--models-dir", str(models_dir), "--clients", "4", "--seconds", "10",
                        "--stop-after", "2", "--restart-after", "1"]) == 0
    text = capsys.readouterr().out
    assert "failed: 0 (goal 0)" in text and "A rejoined: True" in text


def test_memory_bench_times_both_allocator_modes_in_their_own_processes(models_dir: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    assert prune_bench(["memory", "--models-dir", str(models_dir), "--variants", "dense", "channel-keep0.50",
                        "--rounds", "1", "--passes", "3", "--batch", "8", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "round 1: default measured" in text and "round 1: retained measured" in text
    assert "| dense |" in text and "| channel-keep0.50 |" in text and "peak RSS of a child" in text
