"""Loads models/ (manifest + verified safetensors checkpoints), builds every variant's compact
network (training/compact.py: emptied channels dropped, BN folded, dense or sparse per layer as
measured here), warms up and measures latency on this machine. The service's single source of
truth about variants. Only the compact networks stay in memory: the loaded models are dropped."""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from training.checkpoint import CheckpointError, load_model
from training.compact import BATCH_BUCKETS, CompactNet, calibrate, compact
from training.model import TTA_LEVELS, tta_logits

log = logging.getLogger("app.registry")

LATENCY_BATCHES = BATCH_BUCKETS  # the batch sizes the execution paths are chosen for
GRANULARITIES = ("weight", "channel")


class ModelsError(RuntimeError):
    """models/ cannot be served; the message names the file and the reason."""


@dataclass
class Variant:
    name: str
    keep: float
    sparsity: float
    granularity: str
    criterion: str
    file: str
    bytes: int
    sha256: str
    params: dict[str, int]
    finetuned: bool
    base: str | None
    test_acc_mean: float
    test_acc_std: float
    test_acc_per_seed: list[float]
    drop: float
    net: CompactNet = field(repr=False)
    test_acc_no_tta_mean: float | None = None  # the same network without test-time augmentation
    latency: dict[int, dict[str, float]] = field(default_factory=dict)  # batch → p50_ms, p95_ms, images_per_s

    def throughput(self, batch: int = LATENCY_BATCHES[-1]) -> float:
        return self.latency.get(batch, {}).get("images_per_s", 0.0)

    def describe(self) -> dict:
        return {
            "name": self.name, "keep": self.keep, "sparsity": self.sparsity, "granularity": self.granularity,
            "criterion": self.criterion, "finetuned": self.finetuned, "params": self.params,
            "checkpoint_bytes": self.bytes, "base_checkpoint": self.base, "test_acc_mean": self.test_acc_mean,
            "test_acc_std": self.test_acc_std, "test_acc_per_seed": self.test_acc_per_seed, "drop": self.drop,
            "test_acc_no_tta_mean": self.test_acc_no_tta_mean,
            "latency": {f"batch_{b}": v for b, v in sorted(self.latency.items())},
            "resident_bytes": self.net.nbytes(), "execution": self.net.describe(),
            "backends": self.net.backend_summary(),
        }


_REQUIRED_VARIANT_KEYS = ("name", "keep", "file", "sha256", "params", "test_acc_mean", "test_acc_std", "drop")


class Registry:
    """Everything loaded from one models directory."""

    def __init__(self, models_dir: Path, precision: str = "fp32", probe_runs: int = 20, onnx_runtime: bool = True
                 ) -> None:
        self.models_dir = Path(models_dir)
        self.precision = precision
        self.tta = 0  # test-time augmentation level, from the manifest
        self.onnx_runtime = onnx_runtime
        self.probe_runs = probe_runs
        self.manifest: dict = {}
        self.classes: list[str] = []
        self.mean: list[float] = []
        self.std: list[float] = []
        self.variants: list[Variant] = []  # sorted by keep, densest first
        self.ready = False
        self.error: str | None = None
        self._base_cache: dict = {}
        self._lock = threading.Lock()  # one forward pass at a time: 2 cores, torch already uses both

    # -- loading ---------------------------------------------------------------------------
    def load(self) -> None:
        """Verify and build every variant, then warm up and measure; sets ready or error."""
        try:
            self._load_manifest()
            for entry in self.manifest["variants"]:
                self.variants.append(self._load_variant(entry))
            self.variants.sort(key=lambda v: (GRANULARITIES.index(v.granularity), -v.keep))
            self._base_cache.clear()
            self._measure()
            self.ready = True
            log.info("ready: %d variants from %s", len(self.variants), self.models_dir)
        except (ModelsError, CheckpointError) as exc:
            self.error = str(exc)
            log.error("models cannot be served: %s", exc)

    def _load_manifest(self) -> None:
        if not self.models_dir.exists():
            raise ModelsError(f"{self.models_dir}: models directory does not exist (set MODELS_DIR)")
        if not self.models_dir.is_dir():
            raise ModelsError(f"{self.models_dir}: MODELS_DIR is not a directory")
        if not os.access(self.models_dir, os.R_OK | os.X_OK):
            raise ModelsError(f"{self.models_dir}: models directory is not readable (permission denied)")
        path = self.models_dir / "manifest.json"
        try:
            self.manifest = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ModelsError(f"{path}: manifest is missing (run prune-train or set MODELS_DIR)") from exc
        except PermissionError as exc:
            raise ModelsError(f"{path}: cannot read manifest (permission denied)") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelsError(f"{path}: manifest is not valid JSON ({exc})") from exc
        try:
            self.classes = [str(c) for c in self.manifest["classes"]]
            self.mean = [float(x) for x in self.manifest["normalization"]["mean"]]
            self.std = [float(x) for x in self.manifest["normalization"]["std"]]
            self.tta = int(self.manifest.get("tta", 0))
            if self.tta not in TTA_LEVELS:
                raise ValueError(f"tta must be one of {TTA_LEVELS}, got {self.tta}")
            variants = self.manifest["variants"]
            if not variants:
                raise ModelsError(f"{path}: manifest lists no variants")
            for i, entry in enumerate(variants):
                missing = [k for k in _REQUIRED_VARIANT_KEYS if k not in entry]
                if missing:
                    raise ModelsError(f"{path}: variant #{i} lacks {', '.join(missing)}")
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelsError(f"{path}: manifest does not follow schema version 1 (missing or bad {exc})") from exc

    def _load_variant(self, entry: dict) -> Variant:
        file = self.models_dir / entry["file"]
        if not file.resolve().is_relative_to(self.models_dir.resolve()):
            raise ModelsError(f"manifest variant {entry['name']!r} points outside the models directory: {file}")
        # sha256-verified, safetensors only; a variant stored as a mask over dense.safetensors shares
        # one verified read of it through the cache.
        model = load_model(file, entry["sha256"], root=self.models_dir, base_cache=self._base_cache)
        if model.config.num_classes != len(self.classes):
            raise ModelsError(f"{file}: model has {model.config.num_classes} outputs, manifest {len(self.classes)}")
        net = compact(model)
        del model  # only the compact network is kept: no dense copy per variant
        if self.precision == "bf16":
            net = net.to(torch.bfloat16)
        granularity = entry.get("granularity", "weight")
        if granularity not in GRANULARITIES:
            raise ModelsError(f"manifest variant {entry['name']!r}: unknown granularity {granularity!r}")
        return Variant(
            name=entry["name"], keep=float(entry["keep"]), sparsity=float(entry.get("sparsity", 1 - entry["keep"])),
            granularity=granularity, criterion=entry.get("criterion", "gate"),
            file=entry["file"], bytes=int(entry.get("bytes", file.stat().st_size)), sha256=entry["sha256"],
            params={k: int(v) for k, v in entry["params"].items()}, finetuned=bool(entry.get("finetuned", False)),
            base=entry.get("base"),
            test_acc_mean=float(entry["test_acc_mean"]), test_acc_std=float(entry["test_acc_std"]),
            test_acc_per_seed=[float(a) for a in entry.get("test_acc_per_seed", [])], drop=float(entry["drop"]),
            net=net, test_acc_no_tta_mean=(float(entry["test_acc_no_tta_mean"])
                                           if entry.get("test_acc_no_tta_mean") is not None else None),
        )

    def _measure(self) -> None:
        """Choose each layer's execution path, then time every variant at batch 1, 8 and 64 on this
        machine (median of runs). In bfloat16 only the dense paths run (see compact.calibrate)."""
        for variant in self.variants:
            try:
                calibrate(variant.net, onnx=self.onnx_runtime)
            except Exception as exc:  # noqa: BLE001 - a failed optimisation must not stop serving
                log.warning("%s: execution path calibration failed (%s); it runs dense in PyTorch", variant.name, exc)
                variant.net.reset_paths()
            for batch in LATENCY_BATCHES:
                x = torch.randn(batch, 3, 32, 32)
                self.forward(variant, x)  # warm-up: allocator, oneDNN primitive cache
                times = []
                for _ in range(self.probe_runs):
                    began = time.perf_counter()
                    self.forward(variant, x)
                    times.append(time.perf_counter() - began)
                p50 = statistics.median(times)
                variant.latency[batch] = {"p50_ms": p50 * 1e3, "p95_ms": percentile(times, 95) * 1e3,
                                          "images_per_s": batch / p50}

    # -- inference -------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, variant: Variant, images: Tensor) -> Tensor:
        """Normalised float images [N, 3, 32, 32] → class probabilities [N, C] (float32)."""
        with self._lock:
            # The manifest's test-time augmentation (its accuracies were measured with it): every view
            # of every image goes through the network in one batch, so its cost is in every latency.
            logits = tta_logits(variant.net, images.contiguous(memory_format=torch.channels_last), self.tta)
        return torch.softmax(logits.float(), dim=1)

    # -- selection -------------------------------------------------------------------------
    def keeps(self, granularity: str = "weight") -> list[float]:
        return [v.keep for v in self.variants if v.granularity == granularity]

    def by_keep(self, keep: float, granularity: str = "weight") -> Variant | None:
        for variant in self.variants:
            if variant.granularity == granularity and math.isclose(variant.keep, keep, abs_tol=1e-9):
                return variant
        return None

    def auto(self, max_drop: float) -> Variant | None:
        """Across both granularities: the variant with the best measured throughput (batch 64, this
        machine) whose accuracy drop is ≤ max_drop points; ties go to the sparser one."""
        eligible = [v for v in self.variants if v.drop <= max_drop]
        return max(eligible, key=lambda v: (v.throughput(), -v.keep)) if eligible else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def resident_memory_bytes() -> int | None:
    """This process's resident set size (Linux /proc; None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
