"""`prune-bench plan`: measure the execution plan of every variant once, on this machine, and store
it where the service finds it (models/plans/), so that `prune-serve` starts in seconds with stable
figures instead of calibrating at every start.

Per variant: the fastest execution path per layer and batch bucket (engine/compact.py: calibrate),
then --rounds rounds of --probe-runs timed forward passes per batch bucket through the service's
own forward at every test-time augmentation level a request may choose (the served one is the
variant's headline figure), variants interleaved in an order rotated every round. The plan keeps,
per bucket and level, the median over rounds of each round's p50 and p95. The file is keyed by CPU
model, microarchitecture (CPUID family and model) and instruction set, torch version, precision and
threads: make one per thread count you serve with (`--workers 2` on 2 cores runs 1 thread per worker).

    prune-bench plan --models-dir models                 # threads = usable cores, precision as served
    prune-bench plan --models-dir models --threads 1     # for prune-serve --workers 2 on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from app.registry import LATENCY_BATCHES, Registry
from app.settings import Settings, usable_cores
from core.hardware import retain_freed_memory
from core.model import TTA_LEVELS
from engine import plan as plans
from engine.compact import calibrate


def measure_plan(registry: Registry, rounds: int, probe_runs: int) -> dict[str, dict]:
    """Calibrate every variant, then time it at every TTA level over ``rounds`` interleaved rounds; plan
    entries by name."""
    for variant in registry.variants:
        calibrate(variant.net, onnx=registry.onnx_runtime)  # path choice, as the service would make it
        print(f"calibrated {variant.name}: {variant.net.path_summary()}", flush=True)
    samples: dict[str, dict[int, list[dict]]] = {v.name: {level: [] for level in TTA_LEVELS}
                                                 for v in registry.variants}
    order = list(registry.variants)
    for round_index in range(rounds):
        shift = round_index * len(order) // max(1, rounds)
        for variant in order[shift:] + order[:shift]:
            for level in TTA_LEVELS:
                samples[variant.name][level].append(registry.measure(variant, probe_runs, level))
        print(f"round {round_index + 1}/{rounds} measured", flush=True)
    entries = {}
    for variant in registry.variants:
        variant.latency_by_tta = {level: _medians(samples[variant.name][level]) for level in TTA_LEVELS}
        variant.latency = variant.latency_by_tta[registry.tta]
        entries[variant.name] = registry.plan_entry(variant)
    return entries


def _medians(rounds: list[dict]) -> dict[int, dict]:
    """Per batch size: the median over rounds of each round's p50 and p95, the fastest pass of all rounds,
    and every round's p50."""
    latency = {}
    for batch in LATENCY_BATCHES:
        p50 = statistics.median(s[batch]["p50_ms"] for s in rounds)
        latency[batch] = {"p50_ms": p50, "images_per_s": batch / (p50 / 1e3),
                          "p95_ms": statistics.median(s[batch]["p95_ms"] for s in rounds),
                          "min_ms": min(s[batch]["min_ms"] for s in rounds),
                          "rounds_p50_ms": [round(s[batch]["p50_ms"], 4) for s in rounds]}
    return latency


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prune-bench plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default="models", help="the models directory to plan for")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads, as the service will run them (0: the usable cores)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="inference precision, as the service will run it (auto: the service's rule)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds (median reported)")
    p.add_argument("--probe-runs", type=int, default=20, help="timed forward passes per batch size and round")
    p.add_argument("--no-onnx", action="store_true", help="plan without the ONNX Runtime backend (ONNX_RUNTIME=false)")
    p.add_argument("--out", help="plan directory (default: MODELS_DIR/plans, where the service looks first)")
    p.add_argument("--no-retain-memory", action="store_true",
                   help="measure with glibc's allocator defaults (for a service run with RETAIN_FREED_MEMORY=false)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.probe_runs < 3:
        p.error("--rounds must be ≥ 1 and --probe-runs ≥ 3")

    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    retained = not args.no_retain_memory and retain_freed_memory()  # before any model is loaded, as the service
    precision = Settings(precision=args.precision).inference_precision()
    registry = Registry(Path(args.models_dir), precision, probe_runs=args.probe_runs, onnx_runtime=not args.no_onnx)
    began = time.perf_counter()
    registry.load_models()
    if not registry.ready:
        print(f"prune-bench plan: models not servable: {registry.error}", file=sys.stderr)
        return 1
    key = plans.plan_key(precision, threads, memory_retained=retained)
    command = "prune-bench plan " + " ".join(argv if argv is not None else sys.argv[2:])
    plan = plans.new_plan(key, command.strip(), args.rounds, registry.tta)
    plan["variants"] = measure_plan(registry, args.rounds, args.probe_runs)
    path = Path(args.out or Path(args.models_dir) / "plans") / plans.plan_filename(key)
    plans.write(path, plan)

    print(f"\n{key['cpu_model']} ({key['isa']}), torch {key['torch']}, {precision}, {threads} threads, "
          f"TTA {registry.tta}, freed memory {'retained' if retained else 'returned (glibc defaults)'}; "
          f"median of {args.rounds} rounds × {args.probe_runs} passes")
    levels = " / ".join(str(level) for level in TTA_LEVELS)
    print(f"| variant | keep | paths | b1 p50 ms | b8 p50 ms | b64 p50 ms | b64 images/s | b64 spread over rounds | "
          f"b64 images/s at TTA {levels} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v in registry.variants:
        rounds64 = v.latency[64]["rounds_p50_ms"]
        spread = (max(rounds64) - min(rounds64)) / statistics.median(rounds64)
        per_level = " / ".join(f"{v.latency_by_tta[level][64]['images_per_s']:.0f}" for level in TTA_LEVELS)
        print(f"| {v.name} | {v.keep:g} | {v.net.path_summary()} | {v.latency[1]['p50_ms']:.2f} | "
              f"{v.latency[8]['p50_ms']:.2f} | {v.latency[64]['p50_ms']:.2f} | {v.throughput():.0f} | "
              f"{spread * 100:.1f}% | {per_level} |")
    print(f"\nplan written to {path} in {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
