"""Execution plans: which path each variant runs at each batch bucket, and how fast it ran there.

Measuring the fastest path (``engine.compact.calibrate``) and timing every variant takes tens of
seconds on 2 cores, and its figures are noisy from one start to the next. A plan records the result
once, for one machine: per variant (identified by its checkpoint's sha256), each layer's path and
the network backend per batch bucket, and the latency figures (median of several rounds). It is
only valid on the machine kind that measured it, so it is keyed by CPU model, microarchitecture (CPUID
family and model) and instruction set, torch version, inference precision and thread count, and the
service times one variant before it trusts a plan's figures (``fits``).

Plans are made by ``prune-bench plan`` (stored in ``models/plans/``) or, when none matches, by the
service itself in the background (stored in a cache directory, so the next start and the other
workers reuse it). Applying a plan builds only the structures it names (CSR weights, direct-sparse
kernels, an ONNX Runtime session): no timing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

from core.hardware import Capabilities, detect
from engine import sparse_kernels
from engine.compact import BATCH_BUCKETS, PATHS, CompactNet, OnnxSession, onnxruntime_available

log = logging.getLogger("engine.plan")
PLAN_VERSION = 1
BACKENDS = ("torch", "onnxruntime")


class PlanError(ValueError):
    """A plan that cannot be read or does not fit the network it is applied to."""


def isa_level(caps: Capabilities) -> str:
    """The instruction-set tier that decides which kernels are fast (and whether bf16 is native)."""
    flags = caps.cpu_flags
    for name, needed in (("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx512", "avx512f"),
                         ("avx2", "avx2")):
        if needed in flags:
            return name
    return "baseline"


def plan_key(precision: str, threads: int | None = None, caps: Capabilities | None = None,
             memory_retained: bool = True) -> dict:
    """What a plan's figures depend on. Two machines with equal keys run the same kernels, with the
    same allocator behaviour (``memory_retained``: core.hardware.retain_freed_memory applied; glibc's
    defaults page-fault activations back in every pass, ~1.4x slower at batch 64)."""
    caps = caps or detect()
    return {"cpu_model": caps.cpu_model, "cpu_id": caps.cpu_id, "isa": isa_level(caps), "torch": torch.__version__,
            "precision": precision, "threads": int(threads or torch.get_num_threads()),
            "memory_retained": bool(memory_retained)}


def plan_filename(key: dict) -> str:
    """A readable, filesystem-safe name, e.g. plan-amd-epyc-family-25-model-17-avx512_bf16-torch2.14.1-bf16-2t.json."""
    cpu = re.sub(r"[^a-z0-9]+", "-", f"{key['cpu_model']} {key.get('cpu_id', '')}".lower()).strip("-")[:80] or "cpu"
    torch_version = re.sub(r"[^A-Za-z0-9.]+", "_", key["torch"])
    allocator = "" if key.get("memory_retained", True) else "-malloc-default"
    return f"plan-{cpu}-{key['isa']}-torch{torch_version}-{key['precision']}-{key['threads']}t{allocator}.json"


def snapshot(net: CompactNet) -> dict:
    """The calibrated choices of ``net``: per layer and bucket its path, per bucket its backend."""
    return {"paths": {name: {str(b): conv.paths.get(b, "dense") for b in BATCH_BUCKETS}
                      for name, conv in zip(net.layer_names, net.convs)},
            "backends": {str(b): net.backends.get(b, "torch") for b in BATCH_BUCKETS}}


def apply(net: CompactNet, entry: dict, onnx_runtime: bool = True) -> None:
    """Set ``net``'s paths and backends from a plan entry, building only what they use. Raises
    PlanError (leaving ``net`` on its dense paths) when the entry cannot be applied exactly: other
    layers, an unknown path, a sparse path the kernels here cannot run, or an ONNX Runtime backend
    where ONNX Runtime is off or missing."""
    net.reset_paths()
    try:
        paths, backends = entry["paths"], entry["backends"]
        if set(paths) != set(net.layer_names):
            raise PlanError(f"plan layers {sorted(paths)} differ from the network's {sorted(net.layer_names)}")
        float32 = net.head_weight.dtype == torch.float32
        for name, conv in zip(net.layer_names, net.convs):
            chosen = {int(b): p for b, p in paths[name].items()}
            unknown = set(chosen.values()) - set(PATHS)
            if unknown:
                raise PlanError(f"{name}: unknown path {sorted(unknown)}")
            if set(chosen.values()) != {"dense"}:
                if not float32:
                    raise PlanError(f"{name}: sparse paths need a float32 network")
                conv.enable_sparse()
                sparse_kernels.set_threads(torch.get_num_threads())
                missing = set(chosen.values()) - set(conv.available_paths())
                if missing:
                    raise PlanError(f"{name}: path {sorted(missing)} is not available here (numba missing?)")
            conv.paths = {b: p for b, p in chosen.items() if p != "dense"}
            conv.drop_unused_paths()
        chosen_backends = {int(b): v for b, v in backends.items()}
        if set(chosen_backends.values()) - set(BACKENDS):
            raise PlanError(f"unknown backend in {sorted(set(chosen_backends.values()))}")
        if "onnxruntime" in chosen_backends.values():
            if not (onnx_runtime and float32 and onnxruntime_available()):
                raise PlanError("the plan runs ONNX Runtime, which is off, missing, or not float32 here")
            net.onnx_session = OnnxSession.of_compact(net, torch.get_num_threads())
        net.backends = {b: v for b, v in chosen_backends.items() if v != "torch"}
    except PlanError:
        net.reset_paths()
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        net.reset_paths()
        raise PlanError(f"malformed plan entry ({exc!r})") from exc


def entry_for(plan: dict | None, name: str, sha256: str) -> dict | None:
    """The plan's entry for a variant, only if it was measured on the very same checkpoint."""
    if not plan:
        return None
    entry = plan.get("variants", {}).get(name)
    return entry if isinstance(entry, dict) and entry.get("sha256") == sha256 else None


def read(path: Path) -> dict:
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path}: cannot read plan ({exc})") from exc
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION or not isinstance(plan.get("variants"), dict):
        raise PlanError(f"{path}: not a version-{PLAN_VERSION} plan")
    return plan


def find(directories: list[Path], key: dict, skip: frozenset[Path] = frozenset()) -> tuple[dict, Path] | None:
    """The first readable plan for ``key`` in ``directories`` (in order) but those in ``skip``, with its path."""
    name = plan_filename(key)
    for directory in directories:
        path = Path(directory) / name
        if path in skip or not path.is_file():
            continue
        try:
            plan = read(path)
        except PlanError as exc:
            log.warning("ignoring execution plan %s", exc)
            continue
        if plan.get("key") == key:
            return plan, path
    return None


# Before its figures are trusted, a plan's first variant is timed here at CHECK_BATCH images and TTA
# level CHECK_TTA: the fastest of CHECK_RUNS passes against the plan's fastest pass there (its median in a
# plan written before fastest passes were recorded). Fastest against fastest, because load only ever slows
# a pass: with two busy loops on a 2-core machine a start-up's median ran 2.3x the next start's fastest
# pass (1.30 vs 0.57 ms), and on CI the service once refused the plan it had measured itself. Equal keys do not make
# equal machines (clock, cache, a busy host; a VM that names every AMD CPU "AMD EPYC"): a Zen 5 plan on a
# Zen 4 VM with the same key was 2.1x too fast at this point, and keep=auto's latency budgets would have
# been judged on it. Run-to-run noise here is far below 1.5x; below a millisecond (tiny networks) it is
# not, and a difference that small misleads no budget.
CHECK_BATCH = 8
CHECK_TTA = 0
CHECK_RUNS = 9
SPEED_TOLERANCE = 1.5
SLACK_MS = 1.0


def check_point(entry: dict) -> float:
    """The plan's fastest pass (ms) for ``entry``'s variant at CHECK_BATCH images and level CHECK_TTA, or
    its median where the plan has no fastest pass."""
    figures = entry["latency_by_tta"][str(CHECK_TTA)][str(CHECK_BATCH)]
    return float(figures.get("min_ms", figures["p50_ms"]))


def fits(plan_ms: float, here_ms: float, tolerance: float = SPEED_TOLERANCE, slack_ms: float = SLACK_MS) -> bool:
    """True when this machine ran the check within ``tolerance``x of the plan's figure, either way, or
    within ``slack_ms`` of it."""
    if not (plan_ms > 0 and here_ms > 0):
        return False
    return abs(here_ms - plan_ms) <= slack_ms or 1 / tolerance <= here_ms / plan_ms <= tolerance


def write(path: Path, plan: dict) -> None:
    """Atomically (a reader sees the old file or the new one, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".plan-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(plan, f, indent=1, sort_keys=True)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600: other users (a container's service user) must read it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def new_plan(key: dict, command: str, rounds: int, tta: int) -> dict:
    return {"version": PLAN_VERSION, "key": key, "command": command, "rounds": rounds, "tta": tta, "variants": {}}


class CalibrationLock:
    """One calibrating process per plan file: an advisory lock that the OS releases if its holder
    dies. Other processes (workers) serve on dense paths and wait for the plan to appear."""

    def __init__(self, plan_path: Path) -> None:
        self.path = Path(str(plan_path) + ".lock")
        self._fd: int | None = None

    def acquire(self) -> bool:
        """True if this process now holds the lock (non-blocking)."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
