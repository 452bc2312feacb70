"""Data sources, preprocessing, bad data paths, and a tiny end-to-end pipeline run producing a models/ tree."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from core import checkpoint
from core.hardware import MALLOC_ENV
from engine.compact import compact
from tests.conftest import CLASSES, GLIBC, jpeg_bytes
from training import pipeline
from training.data import DataError, load_dataset, preprocess, split_validation
from training.pipeline import main as prune_train


def test_image_folder_loads_with_alphabetical_classes(image_folder: Path) -> None:
    data = load_dataset(image_folder)
    assert data.classes == list(CLASSES)
    assert data.train_images.shape == (18, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    again = load_dataset(image_folder)  # second load comes from the cache, identical
    assert torch.equal(again.train_images, data.train_images) and again.sha256 == data.sha256


def test_tarball_source_matches_image_folder(image_folder: Path, tmp_path: Path) -> None:
    archive = tmp_path / "set.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(image_folder / "train", arcname="train")
        tar.add(image_folder / "test", arcname="test")
    from_tar, from_dir = load_dataset(archive), load_dataset(image_folder)
    assert torch.equal(from_tar.train_images, from_dir.train_images)
    assert torch.equal(from_tar.test_labels, from_dir.test_labels)
    assert len(from_tar.sha256) == 64


def _write_cifar_batch(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
    batch["labels"] = [int(x) for x in batch["labels"]]
    path.write_bytes(pickle.dumps(batch))


def test_torchvision_cifar10_root(tmp_path: Path) -> None:
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        _write_cifar_batch(folder / f"data_batch_{i}", 4, i)
    _write_cifar_batch(folder / "test_batch", 3, 9)
    data = load_dataset(tmp_path / "cifar")
    assert data.train_images.shape == (20, 3, 32, 32) and len(data.classes) == 10


def test_cifar_batches_refuse_code_execution(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("pwned",))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset(folder)


@pytest.mark.parametrize("layout", ["missing", "empty_dir", "no_test", "not_tar", "one_class"])
def test_bad_data_paths_name_the_expected_layouts(tmp_path: Path, layout: str) -> None:
    target = tmp_path / "data"
    if layout == "empty_dir":
        target.mkdir()
    elif layout == "no_test":
        (target / "train" / "a").mkdir(parents=True)
        (target / "train" / "a" / "x.jpg").write_bytes(jpeg_bytes((1, 2, 3)))
    elif layout == "not_tar":
        target = tmp_path / "data.tar.gz"
        target.write_bytes(b"definitely not a tarball")
    elif layout == "one_class":
        for split in ("train", "test"):
            (target / split / "a").mkdir(parents=True)
            (target / split / "a" / "x.jpg").write_bytes(jpeg_bytes((1, 2, 3)))
    with pytest.raises(DataError, match="expected one of"):
        load_dataset(target)


def test_cli_reports_bad_data_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert prune_train(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_preprocess_handles_every_mode_and_size(mode: str) -> None:
    image = Image.new("RGB", (40, 60), (10, 120, 250)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((60, 40), 40000, dtype=np.uint16))
    out = preprocess(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def test_preprocess_is_identity_on_cifar_sized_rgb() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = preprocess(Image.fromarray(pixels))
    assert torch.equal(out, torch.from_numpy(pixels).permute(2, 0, 1))


def test_validation_split_is_stratified_disjoint_and_seeded() -> None:
    labels = torch.arange(100) % 10
    train, val = split_validation(labels, 20, seed=0)
    assert len(val) == 20 and set(train.tolist()).isdisjoint(val.tolist())
    assert torch.bincount(labels[val]).tolist() == [2] * 10
    assert torch.equal(split_validation(labels, 20, seed=0)[1], val)


def test_a_lamp_ranked_phase_2_ships_under_its_own_name(image_folder: Path, tmp_path: Path) -> None:
    """--prune-criterion lamp: the fine-tuned variants are LAMP-ranked, and named and described so."""
    out = tmp_path / "models"
    args = ["--data", str(image_folder), "--out", str(out), "--work-dir", str(tmp_path / "runs"), "--seeds", "1",
            "--epochs", "1", "--widths", "4", "4", "8", "--stem-width", "4", "--batch-size", "8", "--val-size", "3",
            "--keeps", "0.5", "0.1", "--prune-max-keep", "0.1", "--methods", "gate_magnitude", "--prune-steps", "1",
            "--prune-criterion", "lamp", "--ship-finetune-min-gain", "-100", "--calib-images", "8",
            "--precision", "fp32", "--floor", "0.01", "--channel-keeps"]
    assert prune_train(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    shipped = {v["keep"]: (v["name"], v["criterion"], v["file"], v["finetuned"]) for v in manifest["variants"]}
    assert shipped == {1.0: ("dense", "dense", "variants/dense.safetensors", False),
                       0.5: ("gate_magnitude-keep0.50", "gate_magnitude",  # one-shot: by the ship criterion
                             "variants/gate_magnitude-keep0.50.safetensors", False),
                       0.1: ("lamp-keep0.10", "lamp", "variants/lamp-keep0.10-ft.safetensors", True)}
    assert manifest["training"]["phase2"]["criterion"] == "lamp"


def test_dense_ends_ship_a_fine_tuned_variant_with_stem_and_head_whole(image_folder: Path, tmp_path: Path) -> None:
    """--dense-ends: the phase-2 variant keeps every stem and head weight, still exactly K in all."""
    out = tmp_path / "models"
    args = ["--data", str(image_folder), "--out", str(out), "--work-dir", str(tmp_path / "runs"), "--seeds", "1",
            "--epochs", "1", "--widths", "4", "4", "8", "--stem-width", "4", "--batch-size", "8", "--val-size", "3",
            "--keeps", "0.1", "--methods", "gate_magnitude", "--prune-steps", "2", "--dense-ends",
            "--ship-finetune-min-gain", "-100", "--calib-images", "8", "--precision", "fp32", "--floor", "0.01",
            "--channel-keeps"]
    assert prune_train(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["phase2"]["dense_ends"] is True
    [variant] = [v for v in manifest["variants"] if v["keep"] == 0.1]
    params = variant["params"]
    assert variant["finetuned"] and params["nonzero"] - (params["total"] - params["prunable"]) <= round(
        0.1 * params["prunable"])
    model = checkpoint.load_model(out / variant["file"])  # pruned with the rest they kept 24 % and 88 % here
    assert bool((model.stem.weight != 0).all()) and bool((model.head.weight != 0).all())


def test_channel_stage_scales_ship_narrow_early_wide_late_variants(image_folder: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """--channel-stage-scales: the shipped channel variant has the scaled widths, rounded to --channel-multiple
    (compact, as served), the manifest and summary say which, and a work dir made with other scales or another
    multiple is refused, never mixed in; with even scales the multiple is moot."""
    out, work = tmp_path / "models", tmp_path / "runs"
    args = ["--data", str(image_folder), "--out", str(out), "--work-dir", str(work), "--seeds", "1",
            "--epochs", "1", "--widths", "8", "8", "8", "--stem-width", "8", "--batch-size", "8", "--val-size", "3",
            "--keeps", "0.5", "--prune-steps", "0", "--calib-images", "8", "--precision", "fp32",
            "--channel-keeps", "0.5", "--channel-steps", "1", "--soup", "1"]
    scaled = [*args, "--channel-stage-scales", "0.5", "1", "2"]
    assert prune_train([*scaled, "--channel-multiple", "4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["channel_stage_scales"] == [0.5, 1.0, 2.0]
    assert manifest["training"]["channel_multiple"] == 4
    [variant] = [v for v in manifest["variants"] if v["granularity"] == "channel"]
    assert variant["widths"] == [4, 4, 4, 4, 4, 8, 8]  # 8 × 0.5 × (0.5, 1, 2) = 2, 4, 8, to multiples of 4
    net = compact(checkpoint.load_model(out / variant["file"]))
    assert [conv.weight.shape[0] for conv in net.convs] == variant["widths"]
    assert "| 0.5 | 4/4/4/4/4/8/8 |" in (out / "summary.md").read_text()
    with pytest.raises(SystemExit, match=r"other settings \(channel_stage_scales\);"):
        prune_train(args)  # (the multiple is moot at even scales, so it is not named)
    with pytest.raises(SystemExit, match=r"settings \(channel_multiple\) \(it was made with --channel-multiple 4: "):
        prune_train(scaled)  # the default multiple, 8
    capsys.readouterr()
    with pytest.raises(SystemExit):
        prune_train([*args, "--channel-stage-scales", "0", "1", "1"])
    assert "--channel-stage-scales are positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prune_train([*scaled, "--channel-multiple", "0"])
    assert "--channel-multiple is 1 or more" in capsys.readouterr().err


def test_soup_averages_the_shipped_fine_tunes_and_records_their_first(image_folder: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """--soup N reaches the fine-tunes that can ship (weight and channel; --soup-scope all: every method) and
    the manifest; each soup's first fine-tune is scored too, and the criteria table compares those; below 1
    it is refused; a work dir recorded before either flag existed resumes under its old value, only under it."""
    out, work = tmp_path / "models", tmp_path / "runs"
    args = ["--data", str(image_folder), "--out", str(out), "--work-dir", str(work), "--seeds", "1",
            "--epochs", "1", "--widths", "4", "4", "8", "--stem-width", "4", "--batch-size", "8", "--val-size", "3",
            "--keeps", "0.1", "--methods", "gate_magnitude", "magnitude_gradual", "--prune-steps", "4",
            "--calib-images", "8", "--precision", "fp32", "--channel-keeps", "0.5", "--channel-steps", "2",
            "--ship-finetune-min-gain", "-100"]
    with pytest.raises(SystemExit):
        prune_train([*args, "--soup", "0"])
    assert "--soup averages 1 or more fine-tunes, not 0" in capsys.readouterr().err
    soups, real = [], pipeline.prune_finetune
    monkeypatch.setattr(pipeline, "prune_finetune", lambda *a, **k: soups.append(a[5].soup) or real(*a, **k))
    assert prune_train([*args, "--soup", "2"]) == 0
    assert soups == [2, 1, 2]  # the shipped weight fine-tune, the comparison method's, the channel one
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["phase2"]["soup"] == 2 and manifest["training"]["soup_scope"] == "shipped"
    [variant] = [v for v in manifest["variants"] if v["keep"] == 0.1]
    params = variant["params"]
    assert variant["finetuned"] and params["nonzero"] - (params["total"] - params["prunable"]) <= round(
        0.1 * params["prunable"])  # the average of one mask's fine-tunes keeps that mask
    sweep = {(r["criterion"], r["finetuned"]): r for r in manifest["sweep"] if r["keep"] in (0.1, 0.5)}
    gate, frozen = sweep[("gate_magnitude", True)], sweep[("magnitude_gradual", True)]
    channel = sweep[("channel", True)]
    assert gate["soup"] == channel["soup"] == 2 and "soup" not in frozen
    for row in (gate, channel):
        assert 0 <= row["first_test_acc_mean"] <= 100 and 0 <= row["first_val_acc_mean"] <= 100
    summary = (out / "summary.md").read_text()
    criteria = next(line for line in summary.splitlines() if line.startswith("| keep | gate_magnitude (one-shot)"))
    assert criteria.endswith("| gated gradual (learned gates) | gradual, gates frozen | "
                             "gated gradual (learned gates), soup of 2 |")
    row = next(line for line in summary.splitlines() if line.startswith("| 0.1 |"))
    one, soup = row.split(" | ")[-3], row.split(" | ")[-1].rstrip(" |")
    assert one == f"{gate['first_test_acc_mean']:.2f} ± 0.00" and soup == f"{gate['test_acc_mean']:.2f} ± 0.00"
    assert "one fine-tune (the soup's first)" in summary

    record = json.loads((work / "run-config.json").read_text())
    (work / "run-config.json").write_text(json.dumps({k: v for k, v in record.items() if k != "soup_scope"}))
    with pytest.raises(SystemExit, match=r"other settings \(soup_scope\) \(it was made with --soup 2 --soup-scope all"):
        prune_train([*args, "--soup", "2"])  # a soup recorded before --soup-scope covered every method
    (work / "run-config.json").write_text(json.dumps({k: v for k, v in record.items()
                                                      if k not in ("soup", "soup_scope")}))
    with pytest.raises(SystemExit, match=r"other settings \(soup\) \(it was made with --soup 1: pass"):
        prune_train(args)  # a record without either flag was made without a soup, which is no longer the default
    shutil.rmtree(work / "seed-0")  # (its results were made with a soup: the record above is a stand-in)
    soups.clear()
    assert prune_train([*args, "--soup", "1", "--soup-scope", "all"]) == 0  # without a soup the scope is moot
    assert soups == [1, 1, 1]


def test_soup_scope_all_soups_every_method(image_folder: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["--data", str(image_folder), "--out", str(tmp_path / "models"), "--work-dir", str(tmp_path / "runs"),
            "--seeds", "1", "--epochs", "1", "--widths", "4", "4", "8", "--stem-width", "4", "--batch-size", "8",
            "--val-size", "3", "--keeps", "0.1", "--methods", "gate_magnitude", "magnitude_gradual", "magnitude",
            "--prune-steps", "4", "--calib-images", "8", "--precision", "fp32", "--channel-keeps",
            "--soup", "2", "--soup-scope", "all"]
    soups, real = [], pipeline.prune_finetune
    monkeypatch.setattr(pipeline, "prune_finetune", lambda *a, **k: soups.append(a[5].soup) or real(*a, **k))
    assert prune_train(args) == 0
    assert soups == [2, 2, 2]


def test_tiny_end_to_end_run_produces_a_valid_models_tree(image_folder: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out, work = tmp_path / "models", tmp_path / "runs"
    args = ["--data", str(image_folder), "--out", str(out), "--work-dir", str(work), "--seeds", "2",
            "--epochs", "1", "--widths", "4", "4", "8", "--stem-width", "4", "--batch-size", "8",
            "--val-size", "3", "--keeps", "0.5", "0.1", "--prune-steps", "1", "--calib-images", "8",
            "--precision", "fp32", "--floor", "0.01", "--channel-keeps", "0.5", "--channel-steps", "2"]
    assert prune_train(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["classes"] == list(CLASSES)
    assert {"mean", "std"} <= set(manifest["normalization"]) and manifest["dataset"]["sha256"]
    assert [(v["granularity"], v["keep"]) for v in manifest["variants"]] == [
        ("weight", 1.0), ("weight", 0.5), ("weight", 0.1), ("channel", 0.5)]
    for variant in manifest["variants"]:
        path = out / variant["file"]
        assert path.stat().st_size == variant["bytes"]
        model = checkpoint.load_model(path, variant["sha256"])  # verifies sha256
        nonzero = sum(int(torch.count_nonzero(layer.weight)) for _, layer in model.gated_layers())
        if variant["granularity"] == "channel":  # every conv keeps exactly half its channels (widths 4, 4, 8)
            alive = [int(layer.weight.flatten(1).any(1).sum()) for _, layer, _, _ in model.conv_chain()]
            assert alive == [2, 2, 2, 2, 2, 4, 4]
            assert variant["finetuned"] and 0 < variant["sparsity"] < 1
            continue
        assert nonzero == round(variant["keep"] * variant["params"]["prunable"])
        assert len(variant["test_acc_per_seed"]) == 2
        assert variant["file"].endswith("-ft.safetensors") == variant["finetuned"]
        if not variant["finetuned"]:  # stored as masks over dense.safetensors (or sparser still, where a
            with safe_open(str(path), framework="pt") as f:  # layer keeps a handful of weights: delta-coded)
                bits = [k for k in f.keys() if k.endswith("::bits")]
                values = [k for k in f.keys() if k.endswith("::values")]
                assert bits and len(values) <= 1 and variant["base"] == "dense.safetensors"
    criteria = {(r["criterion"], r["finetuned"]) for r in manifest["sweep"]}
    assert {("gate_magnitude", False), ("gate_magnitude", True), ("magnitude_gradual", True), ("magnitude", True),
            ("random", False)} <= criteria
    assert manifest["tta"] == 2 and manifest["hardware"]["per_seed"][0]["device"] == "cpu"
    for variant in manifest["variants"]:  # every TTA level measured per variant; the served one is test_acc
        assert variant["test_acc_tta2_mean"] == variant["test_acc_mean"], variant["name"]
        assert variant["test_acc_tta0_mean"] == variant["test_acc_no_tta_mean"], variant["name"]
        assert 0 <= variant["test_acc_tta1_mean"] <= 100
    # whether training kept freed memory in the heap (core/hardware.py: applied wherever glibc allows it)
    assert manifest["hardware"]["export"]["memory_retained"] is (GLIBC and not any(
        name in os.environ for name in MALLOC_ENV))
    for name in ("tradeoff.png", "results.csv", "results.md", "dense.safetensors"):
        assert (out / name).stat().st_size > 0
    assert Image.open(out / "tradeoff.png").format == "PNG"
    # Re-running resumes: every seed's results are reused, and the export is the same.
    first = (out / "manifest.json").read_text()
    assert prune_train(args) == 0
    again = json.loads((out / "manifest.json").read_text())
    assert again["variants"] == json.loads(first)["variants"]
    # A run cut inside a seed's sweep resumes at the variant it was on: finished ones are not redone.
    (work / "seed-0" / "results.json").unlink()
    cut = sorted((work / "seed-0" / "sweep").glob("*-ft.json"))
    assert len(cut) == 3  # 3 phase-2 methods at keep 0.1 (0.5 is above --prune-max-keep)
    cut[0].unlink()
    calls = []
    real = pipeline.prune_finetune
    monkeypatch.setattr(pipeline, "prune_finetune", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    assert prune_train(args) == 0
    assert len(calls) == 1  # the one missing variant (channel variants are cached per keep as well)
    assert json.loads((out / "manifest.json").read_text())["variants"] == json.loads(first)["variants"]
    # ... but a work dir made with other flags is refused, never mixed in.
    with pytest.raises(SystemExit, match="other settings.*epochs"):
        prune_train([*args, "--epochs", "2"])
    # ... and so is one made by older training code with the same flags (RECIPE_VERSION).
    record = json.loads((work / "run-config.json").read_text())
    (work / "run-config.json").write_text(json.dumps({**record, "recipe_version": record["recipe_version"] - 1}))
    with pytest.raises(SystemExit, match="other settings.*recipe_version"):
        prune_train(args)
    # ... and so is one trained in another precision: the record holds the precision `auto` resolved to.
    (work / "run-config.json").write_text(json.dumps({**record, "precision": "bf16"}))
    with pytest.raises(SystemExit, match=r"other settings \(precision\) \(it was trained in bf16"):
        prune_train(args)


def test_same_seed_same_numbers(image_folder: Path, tmp_path: Path) -> None:
    def run(tag: str) -> dict:
        args = ["--data", str(image_folder), "--out", str(tmp_path / tag), "--work-dir", str(tmp_path / f"w{tag}"),
                "--seeds", "1", "--epochs", "1", "--widths", "4", "4", "8", "--stem-width", "4", "--batch-size", "8",
                "--val-size", "3", "--keeps", "0.3", "--prune-steps", "0", "--calib-images", "8", "--precision", "fp32",
                "--channel-keeps", "0.5", "--channel-steps", "2", "--channel-ranking", "taylor"]
        assert prune_train(args) == 0
        return json.loads((tmp_path / tag / "manifest.json").read_text())

    a, b = run("a"), run("b")
    assert a["training"]["channel_ranking"] == "taylor" and a["training"]["recipe_version"] >= 2
    assert [v["sha256"] for v in a["variants"]] == [v["sha256"] for v in b["variants"]]
    assert a["sweep"] == b["sweep"]


def test_a_run_cut_inside_a_fine_tune_resumes_at_its_last_save(image_folder: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """A session that ends mid fine-tune (half an hour of CPU each) costs at most the steps since the last
    save: the next run resumes there, removes the save once the variant is recorded, and exports what an
    uncut run exports. ``--status`` says where a cut run stands and what is left."""
    import training.train as train_module

    def args(tag: str) -> list[str]:
        return ["--data", str(image_folder), "--out", str(tmp_path / tag), "--work-dir", str(tmp_path / f"w{tag}"),
                "--seeds", "1", "--epochs", "1", "--widths", "4", "4", "8", "--stem-width", "4", "--batch-size", "8",
                "--val-size", "3", "--keeps", "0.1", "--methods", "gate_magnitude", "--prune-steps", "6",
                "--calib-images", "8", "--precision", "fp32", "--channel-keeps", "0.5", "--channel-steps", "6",
                "--soup", "1"]  # one fine-tune each (tests/test_training.py cuts a soup in each ingredient)

    def run(tag: str) -> dict:
        assert prune_train(args(tag)) == 0
        return json.loads((tmp_path / tag / "manifest.json").read_text())

    def status(tag: str, *extra: str) -> str:
        capsys.readouterr()
        assert prune_train([*args(tag), "--status", *extra]) == 0
        return capsys.readouterr().out

    saves: list[train_module.Phase2Checkpoint] = []

    def every_two_steps(path: Path) -> train_module.Phase2Checkpoint:
        saves.append(train_module.Phase2Checkpoint(path, every=2))
        return saves[-1]

    monkeypatch.setattr(pipeline, "Phase2Checkpoint", every_two_steps)
    real_teacher, taught = train_module.tta_logits, [0]

    def counted_teacher(*args: object, **kwargs: object) -> torch.Tensor:
        taught[0] += 1
        return real_teacher(*args, **kwargs)

    monkeypatch.setattr(train_module, "tta_logits", counted_teacher)
    uncut = run("a")
    # 6 steps for the weight fine-tune; the channel keep distils from the same dense weights on the same
    # batches, so the seed's on-disk teacher cache serves all of its steps
    assert taught[0] == 6 and (tmp_path / "wa" / "seed-0" / pipeline.TEACHER_CACHE).exists()
    real_loss, calls = train_module._distill_loss, [0]

    def loss(*args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 5:  # step 4 of the first fine-tune, just after its save at step 4
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "_distill_loss", loss)
    with pytest.raises(KeyboardInterrupt):
        run("b")
    assert [p.name for p in (tmp_path / "wb" / "seed-0" / "sweep").glob("*.progress.pt")] == [
        "gate_magnitude-keep0.100-ft.progress.pt"]
    report = status("b")
    # one-shot variants (dense, 2 criteria at 0.1) done, the fine-tune cut after its save at step 4
    assert "seed 0: phase 1 1/1 epochs, sweep 3/4 variants, channel 0/1 keeps; " \
           "gate_magnitude-keep0.100-ft saved at step 4 of 6" in report
    assert "plus what is not timed yet (ft, channel)" in report and "other settings" not in report
    assert "made with other settings than this command's (epochs)" in status("b", "--epochs", "2")
    monkeypatch.setattr(train_module, "_distill_loss", real_loss)
    saves.clear()
    capsys.readouterr()
    taught[0] = 0
    resumed = run("b")
    assert taught[0] == 2  # steps 4 and 5: the teacher's logits for steps 0-3 were saved with the progress
    assert "gate_magnitude-keep0.100-ft saved at step 4 of 6" in capsys.readouterr().out  # where it picked up
    assert [s.resumed_step for s in saves] == [4, 0]  # the weight fine-tune resumed; the channel one began
    assert not list((tmp_path / "wb").rglob("*.progress.pt*"))
    assert "left: nothing" in status("b")
    assert [v["sha256"] for v in resumed["variants"]] == [v["sha256"] for v in uncut["variants"]]
    assert resumed["sweep"] == uncut["sweep"]


def test_status_says_which_soup_ingredient_a_cut_fine_tune_is_in(tmp_path: Path) -> None:
    """A soup's save counts the work of every ingredient: step 4 of 6 in the third is not 4/6 done."""
    save = tmp_path / "keep0.1.progress.pt"
    torch.save({"step": 4, "soup": {"ingredient": 2, "share": 0.75}}, save)
    assert pipeline._saved_progress(save, 6) == ("saved at step 4 of 6 of soup ingredient 3", 0.75)
    torch.save({"step": 3, "soup": {"ingredient": 0, "share": 0.25}}, save)
    assert pipeline._saved_progress(save, 6) == ("saved at step 3 of 6", 0.25)
    torch.save({"step": 3}, save)  # saved before soups existed
    assert pipeline._saved_progress(save, 6) == ("saved at step 3 of 6", 0.5)
    save.write_bytes(b"damaged")
    assert pipeline._saved_progress(save, 6) is None


def test_io_helper_reads_jpeg_bytes() -> None:
    assert Image.open(io.BytesIO(jpeg_bytes((1, 2, 3)))).size == (32, 32)


def test_summary_quotes_the_manifest(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    args = ["--data", str(image_folder), "--out", str(out), "--work-dir", str(tmp_path / "runs"), "--seeds", "1",
            "--epochs", "1", "--widths", "4", "4", "8", "--stem-width", "4", "--batch-size", "8", "--val-size", "3",
            "--keeps", "0.3", "0.1", "0.05", "--prune-steps", "1", "--calib-images", "8", "--precision", "fp32",
            "--prune-criterion", "lamp", "--channel-keeps"]  # none
    assert prune_train(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["phase2"]["criterion"] == "lamp"
    summary = (out / "summary.md").read_text()
    for variant in manifest["variants"]:
        assert f"| {variant['name']} |" in summary and f"{variant['bytes']:,}" in summary
        levels = " / ".join(f"{variant[f'test_acc_tta{level}_mean']:.2f}" for level in (0, 1, 2))
        assert f"| {levels} |" in summary  # the accuracy a request choosing fewer views gets
    assert summary.count("goal ≤") == 3
    with open(out / "results.csv", newline="") as f:
        assert all(row["test_acc_tta1_mean"] for row in csv.DictReader(f))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_before_preprocessing(orientation: int) -> None:
    """A phone stores pixels as the sensor saw them plus an orientation tag; the tag is applied."""
    upright_image = Image.new("RGB", (64, 48), (200, 30, 30))
    for x in range(0, 64):
        for y in range(0, 12):
            upright_image.putpixel((x, y), (20, 20, 220))  # a blue band on top: orientation matters
    # What the camera would store for each tag: the upright picture turned the other way.
    stored = upright_image.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                                      8: Image.Transpose.ROTATE_270}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif.tobytes())
    tagged = Image.open(io.BytesIO(buffer.getvalue()))
    assert torch.equal(preprocess(tagged), preprocess(upright_image))
    assert not torch.equal(preprocess(stored), preprocess(upright_image))  # the tag is what made the difference
