"""The benchmark commands run end to end on tiny models (their numbers are not asserted: benchmarks
are not tests; that they run, and report what they measured, is)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.cli import main as prune_bench
from bench.readme import (
    BEGIN,
    END,
    HEADLINE_BEGIN,
    HEADLINE_END,
    SERVED_BEGIN,
    SERVED_END,
    SUMMARY_BEGIN,
    SUMMARY_END,
)
from tests.conftest import build_models_dir

needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None,
                                   reason="haproxy is not installed (.ci/run installs it)")


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


def test_speed_views_times_stacked_against_one_call_per_view(models_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    manifest = json.loads((models_dir / "manifest.json").read_text())
    manifest["tta"] = 2
    (models_dir / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "speed.json"
    assert prune_bench(["speed", "--models-dir", str(models_dir), "--repeats", "2", "--seconds", "0.01",
                        "--threads", "1", "--batches", "1", "8", "--views", "--no-onnx", "--no-rss",
                        "--json", str(out)]) == 0
    text = capsys.readouterr().out
    views = json.loads(out.read_text())["views"]
    assert (views["level"], views["views"], views["rows_per_call"]) == (2, 6, 64)
    assert set(views["variants"]) == {"dense", "gate-keep0.50", "gate-keep0.10", "channel-keep0.50"}
    for name, figures in views["variants"].items():
        assert set(figures) == {"1", "8"}
        assert all(figures[b][way] > 0 for b in figures for way in ("stacked", "per_view"))
        assert all(figures[b]["max_abs_diff"] < 1e-4 for b in figures)  # float32: the same logits either way
        assert text.count(f"| {name} |") == 3  # the speed table, the layer table and the views table
    assert "TTA level 2 (6 views per image)" in text


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


def test_http_bench_compares_variants_and_configurations(models_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    from tests.live import free_port

    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (.ci/run installs it)")
    assert prune_bench(["http", "--models-dir", str(models_dir), "--variants", "gate-keep0.10", "--clients", "2",
                        "--images", "1", "--max-batch", "1", "8", "--seconds", "1", "--warmup", "1",
                        "--tta", "0", "1", "--port", str(free_port()), "--save", str(tmp_path / "http.json")]) == 0
    text = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 8  # 2 variants (dense added) × 2 TTA levels × 2 server configurations
    assert {(row[2], row[3]) for row in rows} == {(v, t) for v in ("dense", "gate-keep0.10") for t in ("0", "1")}
    dense_served = next(row for row in rows if row[:4] == ["1", "1", "dense", "0"])  # the test manifest serves 0
    assert dense_served[7:9] == ["1.00", "1.00"]  # ×dense is against it, as is ×first config

    saved = json.loads((tmp_path / "http.json").read_text())  # what `prune-bench readme` reads
    assert len(saved["rows"]) == 8 and saved["cores"] >= 1 and saved["command"].startswith("prune-bench http ")
    shipped = {v["name"]: v["sha256"] for v in json.loads((models_dir / "manifest.json").read_text())["variants"]}
    assert saved["checkpoints"] == {name: shipped[name] for name in ("dense", "gate-keep0.10")}


@needs_haproxy
def test_failover_behind_haproxy_loses_no_request(models_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert prune_bench(["failover", "--models-dir", str(models_dir), "--clients", "4", "--seconds", "10",
                        "--stop-after", "2", "--restart-after", "1"]) == 0
    text = capsys.readouterr().out
    assert "failed: 0 (goal 0)" in text and "A rejoined: True" in text


@needs_haproxy
def test_failover_waits_past_its_window_for_a_slow_restart(models_dir: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica that takes longer to start again than the load's --seconds is waited for, not lost."""
    import re
    import subprocess
    import sys

    from bench import failover

    launches: list[int] = []
    launch = failover.launch

    def slow_restart(models_dir: str, port: int, log: Path) -> subprocess.Popen:
        launches.append(port)
        if len(launches) <= 2:  # the first start of A and B
            return launch(models_dir, port, log)
        command = f"sleep 6; exec {sys.executable} -m app.cli --port {port} --models-dir {models_dir}"
        return subprocess.Popen(["sh", "-c", command], stdout=log.open("ab"), stderr=subprocess.STDOUT)

    monkeypatch.setattr(failover, "launch", slow_restart)
    assert prune_bench(["failover", "--models-dir", str(models_dir), "--clients", "2", "--seconds", "3",
                        "--stop-after", "1", "--restart-after", "0.5"]) == 0
    text = capsys.readouterr().out
    assert len(launches) == 3 and "failed: 0 (goal 0)" in text and "A rejoined: True" in text
    ready = float(re.search(r"([\d.]+) s  A ready", text).group(1))
    load = float(re.search(r"([\d.]+) s through HAProxy", text).group(1))
    assert ready > 3 + 6 - 1 and load >= ready  # A came back long after the 3 s window, and the load waited


def test_memory_bench_times_both_allocator_modes_in_their_own_processes(models_dir: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    assert prune_bench(["memory", "--models-dir", str(models_dir), "--variants", "dense", "channel-keep0.50",
                        "--rounds", "1", "--passes", "3", "--batch", "8", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "round 1: default measured" in text and "round 1: retained measured" in text
    assert "| dense |" in text and "| channel-keep0.50 |" in text and "peak RSS of a child" in text


def _http_run(models_dir: Path, rows: list[tuple[str, int, float]]) -> dict:
    """A saved `prune-bench http --save` run of these models' checkpoints."""
    shas = {v["name"]: v["sha256"] for v in json.loads((models_dir / "manifest.json").read_text())["variants"]}
    return {"machine": "Test CPU (avx2)", "cores": 2, "command": "prune-bench http --variants ...", "seconds": 10,
            "date": "2026-01-01", "checkpoints": {v: shas[v] for v, _, _ in rows},
            "rows": [{"variant": v, "tta": tta, "images_per_s": ips, "workers": 1, "max_batch": 64, "images": 64,
                      "clients": 4} for v, tta, ips in rows]}


def test_readme_table_is_written_from_the_manifest_and_checked(models_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnxruntime")

    readme, docs = tmp_path / "README.md", tmp_path / "training.md"
    readme.write_text(f"# title\n\nprose\n\n{BEGIN}\nstale\n{END}\n\n{HEADLINE_BEGIN}\n- stale\n{HEADLINE_END}\n"
                      "\nmore prose\n")
    docs.write_text(f"## results\n{SUMMARY_BEGIN}\n{SUMMARY_END}\n## served\n{SERVED_BEGIN}\n{SERVED_END}\n")
    http, served = tmp_path / "http.json", tmp_path / "served.json"
    # dense at the served level (0 in this manifest) is what × dense divides by; rows at other levels are ignored
    run = _http_run(models_dir, [("dense", 0, 400.0), ("channel-keep0.50", 0, 1000.0), ("gate-keep0.10", 2, 5.0)])
    http.write_text(json.dumps(run))
    served.write_text(json.dumps({**run, "command": "prune-bench serve --data x", "images": 10000, "precision": "bf16",
                                  "tta": 0, "rows": [{"variant": "dense", "served_acc": 90.2, "manifest_acc": 90.0},
                                                     {"variant": "gate-keep0.10", "served_acc": 85.0,
                                                      "manifest_acc": 85.35}]}))
    args = ["readme", "--models-dir", str(models_dir), "--readme", str(readme), "--docs", str(docs),
            "--http", str(http), "--served", str(served)]
    assert prune_bench(args) == 0
    served_text = docs.read_text()
    assert "| dense | 1 | 90.20 | 90.00 | +0.20 |" in served_text
    assert "| gate-keep0.10 | 0.1 | 85.00 | 85.35 | -0.35 |" in served_text
    assert "**0.350 points** (goal ≤ 0.3: not met)" in served_text  # unrounded, judged on the worst variant
    assert "#### Shipped variants" in served_text and "| gate-keep0.10 | weight | 0.1 |" in served_text
    text = readme.read_text()
    assert text.startswith("# title\n\nprose\n\n") and text.endswith("\n\nmore prose\n") and "stale" not in text
    manifest = json.loads((models_dir / "manifest.json").read_text())
    dense = next(v for v in manifest["variants"] if v["name"] == "dense")
    assert f"- **Dense {dense['test_acc_mean']:.2f} %**" in text  # the headline bullets, from the same sources
    assert "every one of the 2 variants agrees with the manifest's figure for the same checkpoint within " \
           "**0.350 points** (`prune-bench serve` on Test CPU (avx2), bf16;" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    for v in manifest["variants"]:
        row = rows[v["name"]]
        assert f"| {v['params']['nonzero']:,} |" in row
        assert f"| {v['test_acc_mean']:.2f} ± {v['test_acc_std']:.2f} | {v['drop']:+.2f} |" in row
        assert f"| {v['bytes'] / 1e6:.2f} MB |" in row
    assert rows["dense"].endswith("| 400 (1.00×) |") and rows["channel-keep0.50"].endswith("| 1000 (2.50×) |")
    assert rows["gate-keep0.10"].endswith("| – |")  # measured only at another level
    assert "Test CPU (avx2), 2 cores, 2026-01-01" in text

    capsys.readouterr()
    assert prune_bench([*args, "--check"]) == 0
    readme.write_text(text.replace(f"{manifest['variants'][0]['test_acc_mean']:.2f} ±", "99.99 ±"))
    assert prune_bench([*args, "--check"]) == 1  # a hand-edited figure is caught, with the diff
    assert "+| dense |" in capsys.readouterr().out
    readme.write_text("no markers\n")
    assert prune_bench([*args, "--check"]) == 2

    readme.write_text(text)  # a saved run of other checkpoints (e.g. from before a rebuild) is refused
    http.write_text(json.dumps({**run, "checkpoints": {**run["checkpoints"], "channel-keep0.50": "0" * 64}}))
    assert prune_bench([*args, "--check"]) == 2
    assert "other checkpoints (channel-keep0.50)" in capsys.readouterr().err


def test_serve_bench_measures_served_accuracy_and_saves_it(models_dir: Path, image_folder: Path,
                                                          tmp_path: Path) -> None:
    from tests.live import free_port

    manifest = json.loads((models_dir / "manifest.json").read_text())
    manifest["training"] = {"release_seed": 1}  # the second seed's checkpoints are the shipped ones
    (models_dir / "manifest.json").write_text(json.dumps(manifest))
    saved = tmp_path / "served.json"
    assert prune_bench(["serve", "--data", str(image_folder), "--models-dir", str(models_dir), "--port",
                        str(free_port()), "--clients", "2", "--seconds", "1", "--save", str(saved)]) == 0
    run = json.loads(saved.read_text())
    assert run["images"] == 3 * 3 and run["command"].startswith("prune-bench serve --data ")
    assert [r["variant"] for r in run["rows"]] == [v["name"] for v in manifest["variants"]]
    for row, entry in zip(run["rows"], manifest["variants"]):
        assert 0 <= row["served_acc"] <= 100 and row["served_acc"] * 9 / 100 == pytest.approx(
            round(row["served_acc"] * 9 / 100))  # a count of the 9 test images
        assert row["manifest_acc"] == entry["test_acc_per_seed"][1]
    assert run["checkpoints"] == {v["name"]: v["sha256"] for v in manifest["variants"]}

    docs, readme = tmp_path / "training.md", tmp_path / "README.md"
    docs.write_text(f"{SUMMARY_BEGIN}\n{SUMMARY_END}\n{SERVED_BEGIN}\n{SERVED_END}\n")
    readme.write_text("no results table here\n")
    assert prune_bench(["readme", "--models-dir", str(models_dir), "--served", str(saved), "--docs", str(docs),
                        "--readme", str(readme)]) == 2  # the README needs its markers
    readme.write_text(f"{BEGIN}\n{END}\n{HEADLINE_BEGIN}\n{HEADLINE_END}\n")
    assert prune_bench(["readme", "--models-dir", str(models_dir), "--served", str(saved), "--docs", str(docs),
                        "--readme", str(readme)]) == 0
    assert all(f"| {r['variant']} |" in docs.read_text() for r in run["rows"])


def test_shipped_readme_tables_match_the_shipped_models() -> None:
    """README.md's results table and docs/training.md's served accuracy are exactly what models/ (manifest,
    checkpoints, saved HTTP and served-accuracy runs) says."""
    pytest.importorskip("onnxruntime")
    root = Path(__file__).resolve().parent.parent
    assert prune_bench(["readme", "--models-dir", str(root / "models"), "--readme", str(root / "README.md"),
                        "--docs", str(root / "docs" / "training.md"), "--check"]) == 0


def test_headline_compares_learned_gates_at_one_fine_tune_each_when_the_shipped_ones_are_soups() -> None:
    from bench.readme import headline

    def sweep_row(criterion: str, acc: float, **extra: float) -> dict:
        return {"criterion": criterion, "keep": 0.1, "finetuned": True, "test_acc_mean": acc, **extra}

    variants = [{"name": "dense", "keep": 1.0, "finetuned": False, "test_acc_mean": 91.0, "test_acc_per_seed": [91.0],
                 "drop": 0.0},
                {"name": "gate_magnitude-keep0.10", "keep": 0.1, "finetuned": True, "test_acc_mean": 90.4,
                 "drop": 0.6}]
    others = [sweep_row("magnitude_gradual", 89.9), sweep_row("magnitude", 89.8)]
    plain = {"variants": variants, "sweep": [sweep_row("gate_magnitude", 90.4), *others]}
    text = headline(plain, None)
    assert "gates frozen: +0.50 points at keep 0.1 (test; evidence" in text and "soups" not in text
    souped = {"variants": variants, "training": {"ship_criterion": "gate_magnitude"},
              "sweep": [sweep_row("gate_magnitude", 90.4, soup=3, first_test_acc_mean=90.0), *others]}
    text = headline(souped, None)
    assert "gates frozen: +0.10 points at keep 0.1 (test, one fine-tune each; evidence" in text
    assert "|W| + the same fine-tune: +0.20 points" in text
    assert "The shipped fine-tunes are soups of 3 (`--soup`): +0.40 points over their first fine-tune alone " \
           "at keep 0.1 (test)." in text
