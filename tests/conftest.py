"""Shared fixtures: tiny synthetic data sets and tiny models, made in the test (no downloads, no training runs)."""

from __future__ import annotations

import gc
import io
import os
import platform
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.model import GatedNet, NetConfig

TINY = NetConfig(widths=(8, 8, 16), stem_width=4, num_classes=3)
CLASSES = ("cat", "dog", "frog")
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"  # mallopt is glibc's


def tiny_model(seed: int = 0) -> GatedNet:
    torch.manual_seed(seed)
    model = GatedNet(TINY)
    with torch.no_grad():  # spread the scores so rankings are meaningful
        for _, layer in model.gated_layers():
            layer.score.normal_(0, 1)
    return model.eval()


def jpeg_bytes(color: tuple[int, int, int], size: tuple[int, int] = (32, 32), fmt: str = "JPEG",
               mode: str = "RGB") -> bytes:
    image = Image.new("RGB", size, color)
    # A little structure so the classes are learnable and JPEG has something to encode.
    for x in range(0, size[0], 4):
        image.putpixel((x, x % size[1]), (255 - color[0], 255 - color[1], 255 - color[2]))
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_image_folder(root: Path, per_class: int = 6) -> Path:
    """An ImageFolder with train/ and test/ and one colour per class."""
    colors = {"cat": (200, 40, 40), "dog": (40, 200, 40), "frog": (40, 40, 200)}
    for split, count in (("train", per_class), ("test", max(2, per_class // 2))):
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                c = tuple(min(255, v + 3 * i) for v in colors[cls])
                (folder / f"{i:04d}.jpg").write_bytes(jpeg_bytes(c))
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PRUNE_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    # A service started in this process froze what was alive (app.service.freeze_long_lived_objects):
    # hand it back to the collector, or every test's app would stay in memory for the whole run.
    gc.unfreeze()


def build_models_dir(root: Path, keeps: tuple[float, ...] = (1.0, 0.5, 0.1), seed: int = 0,
                     channel_keeps: tuple[float, ...] = (0.5,)) -> Path:
    """A models/ tree like prune-train's: tiny pruned checkpoints + manifest. Accuracy figures are
    placeholders for the API to echo (the tests check they are passed through, not their value)."""
    import json

    from core import checkpoint
    from training.prune import prune, prune_channels

    root.mkdir(parents=True, exist_ok=True)
    variants = []
    jobs = [("weight", k) for k in keeps] + [("channel", k) for k in channel_keeps]
    for i, (granularity, keep) in enumerate(jobs):
        model = tiny_model(seed)
        if granularity == "channel":
            prune_channels(model, keep)
        elif keep < 1.0:
            prune(model, "gate", keep)
        criterion = "channel" if granularity == "channel" else "gate" if keep < 1 else "dense"
        name = "dense" if keep == 1.0 else f"{criterion}-keep{keep:.2f}"
        size, sha = checkpoint.save_pruned(model, root / "variants" / f"{name}.safetensors")
        from core.model import count_parameters

        variants.append({"name": name, "criterion": criterion, "keep": keep,
                         "sparsity": round(1 - keep, 4), "granularity": granularity,
                         "file": f"variants/{name}.safetensors", "bytes": size, "sha256": sha,
                         "params": count_parameters(model), "finetuned": keep < 1.0,
                         "test_acc_per_seed": [90.0 - 2 * i, 91.0 - 2 * i], "test_acc_mean": 90.5 - 2 * i,
                         "test_acc_std": 0.7, "drop": 2.0 * i})
    manifest = {"schema_version": 1, "classes": list(CLASSES),
                "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
                "architecture": TINY.to_dict(), "variants": variants}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `prune-serve` process on the tiny models, every variant planned, for a module's tests."""
    from tests.live import LiveServer

    root = tmp_path_factory.mktemp("live")
    server = LiveServer(build_models_dir(root / "models"), PLAN_DIR=str(root / "plans"))
    try:
        server.wait_ready(execution="done")
        yield server
    finally:
        server.stop()
