"""Loads models/ (manifest + verified safetensors checkpoints) and builds every variant's compact
network (engine/compact.py: emptied channels dropped, BN folded). That is quick (seconds), and the
service is ready then, every variant running on its compact dense path. Choosing faster paths and
measuring latency is a second, slower step per variant (``optimise``): from an execution plan
measured earlier on this kind of machine (engine/plan.py), or by calibrating here. The service's
single source of truth about variants. Only the compact networks stay in memory."""

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
from pydantic import ValidationError
from torch import Tensor

from core.checkpoint import CheckpointError, load_model
from core.manifest import SCHEMA_VERSION, Manifest, VariantEntry, describe_error
from core.model import TTA_LEVELS, TTA_VIEWS, tta_logits
from engine import plan as plans
from engine.compact import BATCH_BUCKETS, VIEW_ROWS_PER_CALL, CompactNet, calibrate, compact, interleaved_medians

log = logging.getLogger("app.registry")

LATENCY_BATCHES = BATCH_BUCKETS  # the batch sizes the execution paths are chosen for
GRANULARITIES = ("weight", "channel")
# keep=auto: throughputs within this share of the best count as a tie (timings are noisy), and a
# tie goes to the more accurate variant, then the smaller keep.
NEAR_TIE = 0.05


class Interrupted(Exception):
    """Loading or calibration stopped because the service is shutting down."""


class AutoError(Exception):
    """keep=auto cannot be answered (no variant within max_drop, or no budget given)."""


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
    # Test accuracy at each TTA level a request may ask for (from training; levels it did not record: absent).
    test_acc_by_tta: dict[int, float] = field(default_factory=dict)
    # At the served TTA level: batch → p50_ms, p95_ms, images_per_s (what keep=auto and /metrics use).
    latency: dict[int, dict[str, float]] = field(default_factory=dict)
    # The same per TTA level (the served one included; a plan without every level is measured again).
    latency_by_tta: dict[int, dict[int, dict[str, float]]] = field(default_factory=dict)
    # Where ``latency`` and the execution paths come from: None while the variant still runs on its
    # compact dense path unmeasured; "plan: <file>" or "measured at start-up".
    latency_source: str | None = None

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
            "tta_levels": {str(level): {
                "views": TTA_VIEWS[level], "test_acc_mean": self.test_acc_by_tta.get(level),
                "latency": {f"batch_{b}": v for b, v in sorted(self.latency_by_tta.get(level, {}).items())},
            } for level in TTA_LEVELS},
            "latency_source": self.latency_source, "macs_per_image": self.net.macs(),
            "resident_bytes": self.net.nbytes(), "execution": self.net.describe(),
            "backends": self.net.backend_summary(),
        }


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
        self.entries: list[VariantEntry] = []
        self.classes: list[str] = []
        self.mean: list[float] = []
        self.std: list[float] = []
        self.variants: list[Variant] = []  # sorted by granularity, then keep, densest first
        self.ready = False
        self.error: str | None = None
        self.stopping = threading.Event()  # set at shutdown: loading and calibration stop at the next step
        self._base_cache: dict = {}
        self._lock = threading.Lock()  # one forward pass at a time: 2 cores, torch already uses both
        self.plan_checks: list[dict] = []  # each plan's speed check (check_plan), in the order made
        self._unfit_plans: set[Path] = set()

    # -- loading ---------------------------------------------------------------------------
    def load(self, plan: dict | None = None, plan_source: str = "") -> None:
        """Load, then optimise every variant (from ``plan`` where it matches, else by measuring):
        the synchronous path used by ``prune-serve --check`` and ``prune-bench``."""
        self.load_models()
        if self.ready:
            self.optimise_all(plan, plan_source)

    def optimise_all(self, plan: dict | None = None, plan_source: str = "") -> None:
        for variant in self.variants:
            self.optimise(variant, plans.entry_for(plan, variant.name, variant.sha256), plan_source)

    def load_models(self) -> None:
        """Verify and build every variant on its compact dense path; sets ``ready`` or ``error``.
        Any failure, of any kind, is reported (file and reason), never left hanging."""
        try:
            self._load_manifest()
            for entry in self.entries:
                if self.stopping.is_set():
                    raise Interrupted("shutting down")
                try:
                    self.variants.append(self._load_variant(entry))
                except (ModelsError, CheckpointError):
                    raise
                except Exception as exc:  # noqa: BLE001 - anything else: name the file and the reason
                    raise ModelsError(f"{self.models_dir / entry.file}: cannot load variant {entry.name!r} "
                                      f"({type(exc).__name__}: {exc})") from exc
            self.variants.sort(key=lambda v: (GRANULARITIES.index(v.granularity), -v.keep))
            self._base_cache.clear()
            self.ready = True
            log.info("ready: %d variants from %s", len(self.variants), self.models_dir)
        except Interrupted:
            self.variants = []
            self.error = "shutting down"
        except (ModelsError, CheckpointError) as exc:
            self.variants = []
            self.error = str(exc)
            log.error("models cannot be served: %s", exc)
        except Exception as exc:  # noqa: BLE001 - e.g. a value of the wrong type deep in a checkpoint
            self.variants = []
            self.error = f"{self.models_dir}: cannot load models ({type(exc).__name__}: {exc})"
            log.exception("models cannot be served")

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
            manifest = Manifest.model_validate(self.manifest)
        except ValidationError as exc:
            raise ModelsError(f"{path}: manifest does not follow schema version {SCHEMA_VERSION}: "
                              f"{describe_error(exc)}") from None
        self.classes = manifest.classes
        self.mean, self.std = manifest.normalization.mean, manifest.normalization.std
        self.tta = manifest.tta
        self.entries = manifest.variants

    def _load_variant(self, entry: VariantEntry) -> Variant:
        file = self.models_dir / entry.file
        if not file.resolve().is_relative_to(self.models_dir.resolve()):
            raise ModelsError(f"manifest variant {entry.name!r} points outside the models directory: {file}")
        # sha256-verified, safetensors only; a variant stored as a mask over dense.safetensors shares
        # one verified read of it through the cache.
        model = load_model(file, entry.sha256, root=self.models_dir, base_cache=self._base_cache)
        if model.config.num_classes != len(self.classes):
            raise ModelsError(f"{file}: model has {model.config.num_classes} outputs, manifest {len(self.classes)}")
        net = compact(model)
        del model  # only the compact network is kept: no dense copy per variant
        if self.precision == "bf16":
            net = net.to(torch.bfloat16)
        return Variant(
            name=entry.name, keep=entry.keep, sparsity=entry.sparsity if entry.sparsity is not None else 1 - entry.keep,
            granularity=entry.granularity, criterion=entry.criterion, file=entry.file,
            bytes=entry.bytes if entry.bytes is not None else file.stat().st_size, sha256=entry.sha256,
            params=entry.params, finetuned=entry.finetuned, base=entry.base, test_acc_mean=entry.test_acc_mean,
            test_acc_std=entry.test_acc_std, test_acc_per_seed=entry.test_acc_per_seed, drop=entry.drop, net=net,
            test_acc_no_tta_mean=entry.test_acc_no_tta_mean,
            test_acc_by_tta=entry.test_acc_by_tta() | {self.tta: entry.test_acc_mean},  # the served level's is this
        )

    def float32_net(self, variant: Variant) -> CompactNet:
        """The variant's compact network in float32, rebuilt from its verified checkpoint (the served
        one may be bfloat16): what an edge export must contain."""
        model = load_model(self.models_dir / variant.file, variant.sha256, root=self.models_dir, base_cache={})
        return compact(model)

    def optimise(self, variant: Variant, entry: dict | None = None, source: str = "") -> bool:
        """Give ``variant`` its execution paths and latency figures: from a plan ``entry`` when it
        applies here, else by calibrating and measuring now. Runs under the forward lock, so requests
        see the variant either before or after the switch. Returns True if it measured."""
        with self._lock:
            if entry is not None:
                try:
                    by_tta = {int(level): {int(b): dict(v) for b, v in figures.items()}
                              for level, figures in entry.get("latency_by_tta", {}).items()}
                    if sorted(by_tta) != list(TTA_LEVELS):  # keep=auto could never choose the missing levels
                        raise plans.PlanError("no latency for every TTA level (a plan from before them)")
                    plans.apply(variant.net, entry, self.onnx_runtime)
                    variant.latency = {int(b): dict(v) for b, v in entry["latency"].items()}
                    variant.latency_by_tta = by_tta | {self.tta: variant.latency}
                    variant.latency_source = f"plan: {source}" if source else "plan"
                    return False
                except (plans.PlanError, KeyError, TypeError, ValueError, AttributeError) as exc:
                    log.warning("%s: plan not applicable (%s); measuring here", variant.name, exc)
            try:
                calibrate(variant.net, onnx=self.onnx_runtime, timer=self._timer)
            except Interrupted:
                variant.net.reset_paths()
                raise
            except Exception as exc:  # noqa: BLE001 - a failed optimisation must not stop serving
                log.warning("%s: execution path calibration failed (%s); it runs dense in PyTorch", variant.name, exc)
                variant.net.reset_paths()
            variant.latency_by_tta = {level: self.measure(variant, self.probe_runs, level) for level in TTA_LEVELS}
            variant.latency = variant.latency_by_tta[self.tta]
            variant.latency_source = "measured at start-up"
            return True

    def _timer(self, candidates: dict) -> dict[str, float]:
        if self.stopping.is_set():
            raise Interrupted("shutting down")
        return interleaved_medians(candidates)

    def measure(self, variant: Variant, runs: int, tta: int | None = None) -> dict[int, dict[str, float]]:
        """Latency of the service's forward pass at each batch size, test-time augmentation included (the
        served level, or ``tta``): median, 95th percentile and fastest pass, and the median's throughput."""
        latency = {}
        for batch in LATENCY_BATCHES:
            times = self._times(variant, batch, runs, tta)
            p50 = statistics.median(times)
            latency[batch] = {"p50_ms": p50 * 1e3, "p95_ms": percentile(times, 95) * 1e3,
                              "min_ms": min(times) * 1e3, "images_per_s": batch / p50}
        return latency

    def _times(self, variant: Variant, batch: int, runs: int, tta: int | None) -> list[float]:
        """Seconds per forward pass of ``batch`` random images, ``runs`` times after one warm-up pass."""
        x = torch.randn(batch, 3, 32, 32)
        self._forward(variant, x, tta)  # warm-up: allocator, oneDNN primitive cache
        times = []
        for _ in range(runs):
            if self.stopping.is_set():
                raise Interrupted("shutting down")
            began = time.perf_counter()
            self._forward(variant, x, tta)
            times.append(time.perf_counter() - began)
        return times

    def check_plan(self, plan: dict) -> dict:
        """Time the plan's first variant that has a figure at the check point (engine.plan.CHECK_*) on its
        planned paths, here (the fastest of CHECK_RUNS passes): {"variant", "plan_ms", "here_ms", "fits"};
        a plan with no such variant does not fit (nothing shows that its figures hold here)."""
        for variant in self.variants:
            entry = plans.entry_for(plan, variant.name, variant.sha256)
            if entry is None:
                continue
            with self._lock:
                try:
                    plan_ms = plans.check_point(entry)
                    plans.apply(variant.net, entry, self.onnx_runtime)
                except (plans.PlanError, KeyError, TypeError, ValueError, AttributeError):
                    continue
                # the fastest pass: requests being served meanwhile can only slow a pass down
                here_ms = 1e3 * min(self._times(variant, plans.CHECK_BATCH, plans.CHECK_RUNS, plans.CHECK_TTA))
            return {"variant": variant.name, "plan_ms": round(plan_ms, 3), "here_ms": round(here_ms, 3),
                    "fits": plans.fits(plan_ms, here_ms)}
        return {"variant": None, "plan_ms": None, "here_ms": None, "fits": False}

    def fitting_plan(self, directories: list[Path], key: dict) -> tuple[dict, Path] | None:
        """The first plan for ``key`` in ``directories`` whose figures hold on this machine (check_plan);
        each check is kept in ``plan_checks``, and a plan that failed one is not looked at again."""
        while (found := plans.find(directories, key, frozenset(self._unfit_plans))) is not None:
            plan, path = found
            check = {"plan": str(path), **self.check_plan(plan)}
            self.plan_checks.append(check)
            if check["fits"]:
                return found
            log.warning("execution plan %s does not fit this machine: %s ran %s ms here, %s ms in the plan; "
                        "measuring here instead", path, check["variant"], check["here_ms"], check["plan_ms"])
            self._unfit_plans.add(path)
        return None

    def plan_entry(self, variant: Variant) -> dict:
        """What a plan records for ``variant`` (see engine/plan.py)."""
        return {"sha256": variant.sha256, **plans.snapshot(variant.net),
                "latency": {str(b): v for b, v in variant.latency.items()},
                "latency_by_tta": {str(level): {str(b): v for b, v in figures.items()}
                                   for level, figures in sorted(variant.latency_by_tta.items())}}

    @property
    def optimised(self) -> bool:
        return self.ready and all(v.latency_source for v in self.variants)

    # -- inference -------------------------------------------------------------------------
    def forward(self, variant: Variant, images: Tensor, tta: int | None = None) -> Tensor:
        """Normalised float images [N, 3, 32, 32] → class probabilities [N, C] (float32), at the served
        test-time augmentation level or the request's ``tta``."""
        with self._lock:
            return self._forward(variant, images, tta)

    def level(self, tta: int | None) -> int:
        """The TTA level that answers: the request's, else the one the manifest serves."""
        return self.tta if tta is None else tta

    @torch.inference_mode()
    def _forward(self, variant: Variant, images: Tensor, tta: int | None = None) -> Tensor:
        # The manifest's test-time augmentation unless the request chose a level: every view is a forward
        # pass over the batch (6 at TTA 2; small batches stack them into one call), so its cost is in every
        # latency.
        logits = tta_logits(variant.net, images.contiguous(memory_format=torch.channels_last), self.level(tta),
                            rows_per_call=VIEW_ROWS_PER_CALL)
        return torch.softmax(logits.float(), dim=1)

    # -- selection -------------------------------------------------------------------------
    def keeps(self, granularity: str = "weight") -> list[float]:
        return [v.keep for v in self.variants if v.granularity == granularity]

    def by_keep(self, keep: float, granularity: str = "weight") -> Variant | None:
        for variant in self.variants:
            if variant.granularity == granularity and math.isclose(variant.keep, keep, abs_tol=1e-9):
                return variant
        return None

    def speed_basis(self) -> str:
        """What keep=auto ranks speed by: "measured" (batch-64 throughput from the plan or start-up
        measurement) once every variant has figures, else "compute" (multiply-adds of the compact
        dense path, which is what runs until then). Either way the same figures give the same answer."""
        return "measured" if self.optimised else "compute"

    # A variant at a TTA level is a point of the trade-off: keep=auto chooses among these. The served
    # level's figures are the variant's own (test_acc_mean, drop, latency); other levels' come from
    # the manifest's per-level accuracies and the per-level latencies, where both exist.
    def accuracy(self, variant: Variant, tta: int) -> float | None:
        return variant.test_acc_mean if tta == self.tta else variant.test_acc_by_tta.get(tta)

    def drop(self, variant: Variant, tta: int) -> float | None:
        """Points lost against dense as served (``variant.drop`` at the served level)."""
        accuracy = self.accuracy(variant, tta)
        return None if accuracy is None else variant.drop + variant.test_acc_mean - accuracy

    def latency(self, variant: Variant, tta: int) -> dict[int, dict[str, float]]:
        return variant.latency if tta == self.tta else variant.latency_by_tta.get(tta, {})

    def speed(self, variant: Variant, basis: str, tta: int | None = None) -> float:
        tta = self.level(tta)
        if basis == "measured":
            return self.latency(variant, tta).get(LATENCY_BATCHES[-1], {}).get("images_per_s", 0.0)
        return 1e9 / max(1, variant.net.macs() * TTA_VIEWS[tta])

    def choices(self, basis: str, levels: tuple[int, ...] | None = None) -> list[Choice]:
        """Every variant at every level (of ``levels``) with an accuracy and, on the measured basis, a
        measured speed."""
        return [Choice(v, level) for v in self.variants for level in (TTA_LEVELS if levels is None else levels)
                if self.accuracy(v, level) is not None and (basis == "compute" or self.speed(v, basis, level) > 0)]

    def pareto(self, basis: str | None = None, levels: tuple[int, ...] | None = None) -> list[Choice]:
        """Choices that no other beats on both accuracy and speed (ties are not beaten)."""
        basis = basis or self.speed_basis()
        points = [(c, self.accuracy(c.variant, c.tta), self.speed(c.variant, basis, c.tta))
                  for c in self.choices(basis, levels)]
        return [c for c, acc, speed in points if not any(
            a >= acc and s >= speed and (a > acc or s > speed) for _, a, s in points)]

    def latency_estimate_ms(self, variant: Variant, images: int, queued_images: int = 0,
                            max_batch: int = LATENCY_BATCHES[-1], tta: int | None = None) -> float | None:
        """Estimated p95 wait for ``images`` more images with ``queued_images`` ahead of them: the measured
        p95 of a pass holding them (up to MAX_BATCH) at the level, times the passes needed. None until
        measured."""
        total = queued_images + images
        p95 = p95_ms(self.latency(variant, self.level(tta)), min(total, max_batch))
        return None if p95 is None else p95 * math.ceil(total / max_batch)

    def auto(self, max_drop: float | None = None, max_latency_ms: float | None = None, images: int = 1,
             queued_images: int = 0, max_batch: int = LATENCY_BATCHES[-1],
             levels: tuple[int, ...] | None = None) -> Choice:
        """The variant and TTA level keep=auto answers with, across both granularities and every level
        (or ``levels``), only ever a Pareto-optimal one.

        max_drop only: the fastest whose accuracy drop is ≤ max_drop points; speeds within NEAR_TIE
        of it are a tie, won by accuracy, then by the smaller keep, then by fewer views.
        max_latency_ms (with or without max_drop): the most accurate choice whose estimated latency
        for this request fits (``latency_estimate_ms`` at the current queue depth). When none fits, or
        before latencies are measured, the fastest one: a best effort the caller reports as such.
        Raises AutoError (422) only when no choice is within max_drop, or neither budget is given."""
        if max_drop is None and max_latency_ms is None:
            raise AutoError("keep=auto needs max_drop (accuracy points you accept to lose) and/or max_latency_ms")
        basis = self.speed_basis()
        candidates = self.pareto(basis, levels)
        if not candidates:
            raise AutoError(f"no variant has a recorded accuracy and a speed at TTA level "
                            f"{', '.join(map(str, levels or ()))}; omit tta to let keep=auto choose the level")
        accuracy = {c.key: self.accuracy(c.variant, c.tta) for c in candidates}
        speed = {c.key: self.speed(c.variant, basis, c.tta) for c in candidates}
        if max_drop is not None:
            drops = {c.key: self.drop(c.variant, c.tta) for c in candidates}
            within = [c for c in candidates if drops[c.key] <= max_drop]
            if not within:
                raise AutoError(f"no variant loses at most {max_drop:g} points; smallest drop is "
                                f"{min(drops.values()):.2f}")
            candidates = within
        best = max(speed[c.key] for c in candidates)
        tied = [c for c in candidates if speed[c.key] >= best * (1 - NEAR_TIE)]
        fastest = max(tied, key=lambda c: (accuracy[c.key], -c.variant.keep, -c.tta))
        if max_latency_ms is None or basis != "measured":
            return fastest
        estimates = {c.key: self.latency_estimate_ms(c.variant, images, queued_images, max_batch, c.tta)
                     for c in candidates}
        fitting = [c for c in candidates if estimates[c.key] <= max_latency_ms]
        if not fitting:
            return min(candidates, key=lambda c: (estimates[c.key], -accuracy[c.key], c.variant.keep))
        return max(fitting, key=lambda c: (accuracy[c.key], speed[c.key], -c.variant.keep))


@dataclass(frozen=True, eq=False)
class Choice:
    """A variant at a test-time augmentation level: a point of the trade-off, what keep=auto answers with."""

    variant: Variant
    tta: int

    @property
    def key(self) -> tuple[str, int]:
        return self.variant.name, self.tta


def p95_ms(latency: dict[int, dict[str, float]], batch: int) -> float | None:
    """p95 latency of a forward pass of ``batch`` images: the figure of the smallest measured batch size
    that holds them (conservative), scaled up linearly past the largest."""
    if not latency:
        return None
    sizes = sorted(latency)
    fitting = [b for b in sizes if b >= batch]
    if fitting:
        return latency[fitting[0]]["p95_ms"]
    return latency[sizes[-1]]["p95_ms"] * batch / sizes[-1]


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
