"""What a second thread doing tensor work costs the service's forward passes (models/, no data set).

PyTorch's CPU wheels parallelise with GNU OpenMP, and every thread that starts a parallel region gets a
team of its own. Once the process holds more OpenMP threads than cores, libgomp waits for the next parallel
region by sleeping instead of spinning, so every layer of every pass pays a wake-up. This script loads
``models/`` as the service does (threads, allocator, execution plan), then times the service's forward pass
(TTA included, 64 images) for each variant given, in rounds that alternate between

- ``one team``: the forward pass in the main thread, no other thread has run a parallel op;
- ``two teams``: the same, after a second thread ran one large tensor op (as normalising a 64-image request
  on the event loop did), and then with the forward pass itself in that second thread.

The two-team cases cannot be undone within a process, so each case runs in a child process of its own.

    python scripts/openmp_teams.py channel-keep0.25 channel-keep0.50 dense
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def child(case: str, names: list[str], runs: int) -> dict[str, float]:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from app.registry import Registry
    from app.service import configure_process
    from app.settings import Settings
    from engine import plan as plans

    settings = Settings()
    key = configure_process(settings, settings.inference_precision())
    registry = Registry(settings.models_dir, settings.inference_precision())
    found = plans.find(settings.plan_directories(), key)
    plan = found[0] if found else None
    registry.load(plan, str(found[1]) if found else "")
    images = torch.randn(64, 3, 32, 32)
    other = ThreadPoolExecutor(1)
    if case != "one team":
        other.submit(lambda: images.mul(2.0)).result()  # 196,608 values: above ATen's grain, a parallel op
    result = {}
    for variant in registry.variants:
        if variant.name not in names:
            continue
        registry.optimise(variant, plans.entry_for(plan, variant.name, variant.sha256), "")
        times = []
        for _ in range(runs + 3):
            began = time.perf_counter()
            if case == "two teams, forward in the 2nd thread":
                other.submit(registry.forward, variant, images).result()
            else:
                registry.forward(variant, images)
            times.append((time.perf_counter() - began) * 1e3)
        result[variant.name] = statistics.median(times[3:])  # the first passes warm caches up
    return result


CASES = ("one team", "two teams, forward in the main thread", "two teams, forward in the 2nd thread")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+")
    p.add_argument("--rounds", type=int, default=3, help="child processes per case, cases alternating")
    p.add_argument("--runs", type=int, default=20, help="timed passes per variant in each child")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.variants, args.runs)))
        return
    from bench.speed import machine

    medians: dict[str, dict[str, list[float]]] = {case: {} for case in CASES}
    for round_ in range(args.rounds):
        for case in CASES[round_ % len(CASES):] + CASES[:round_ % len(CASES)]:  # order rotated every round
            out = subprocess.run([sys.executable, __file__, *args.variants, "--runs", str(args.runs),
                                  "--child", case], capture_output=True, text=True, check=True).stdout
            for name, ms in json.loads(out.strip().splitlines()[-1]).items():
                medians[case].setdefault(name, []).append(ms)
    print(f"{machine()}; threads, precision, allocator and plan as the service's; 64 images per pass with the "
          f"manifest's TTA; median over {args.rounds} processes of the median of {args.runs} passes")
    print("| variant | " + " | ".join(f"{case} ms" for case in CASES) + " | slowdown |")
    print("|---|" + "---|" * (len(CASES) + 1))
    for name in args.variants:
        row = [statistics.median(medians[case][name]) for case in CASES]
        print(f"| {name} | " + " | ".join(f"{ms:.1f}" for ms in row) + f" | {max(row[1:]) / row[0]:.2f}× |")


if __name__ == "__main__":
    main()
