"""`prune-bench memory`: what retaining freed memory (RETAIN_FREED_MEMORY, core/hardware.py) buys.

glibc's defaults hand large freed buffers back to the OS, so an inference pass may pay page faults to
get its activations back; the service raises glibc's mmap and trim thresholds at start-up instead.
The setting is per process and cannot be undone, so each mode runs in its own child process: the
children alternate (default, retained, default, ...; the order rotates every round) and each loads
the variants, calibrates them as the service does, and times the service's forward pass (the
manifest's test-time augmentation included) at --batch images. Reported per variant and mode: the
median ms per pass, minor page faults per pass and the child's peak RSS; then retained vs default.

    prune-bench memory --models-dir models --variants dense channel-keep0.75 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("default", "retained")


def child(args: argparse.Namespace) -> dict:
    """One process, one mode: per variant, median ms and minor faults per pass, then peak RSS."""
    if args.mode == "retained":
        from core.hardware import retain_freed_memory

        if not retain_freed_memory():
            raise SystemExit("glibc's mallopt is not available here (or MALLOC_* / GLIBC_TUNABLES is set)")
    import torch

    from core import checkpoint
    from core.model import tta_logits
    from engine.compact import VIEW_ROWS_PER_CALL, calibrate, compact

    torch.set_num_threads(args.threads)
    models_dir = Path(args.models_dir)
    manifest = json.loads((models_dir / "manifest.json").read_text())
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    tta = manifest.get("tta", 0)
    base_cache: dict = {}
    result = {}
    for entry in (e for e in manifest["variants"] if e["name"] in args.variants):
        net = compact(checkpoint.load_model(models_dir / entry["file"], entry["sha256"], root=models_dir,
                                            base_cache=base_cache))
        if args.precision == "bf16":
            net = net.to(torch.bfloat16)
        calibrate(net)
        with torch.inference_mode():
            for _ in range(3):  # warm-up: oneDNN primitives, and glibc's adaptive threshold settles
                tta_logits(net, x, tta, VIEW_ROWS_PER_CALL)
            times, faults = [], []
            for _ in range(args.passes):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                began = time.perf_counter()
                tta_logits(net, x, tta, VIEW_ROWS_PER_CALL)
                times.append(time.perf_counter() - began)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        result[entry["name"]] = {"ms": statistics.median(times) * 1e3, "faults": statistics.median(faults)}
    return {"variants": result, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run(args: argparse.Namespace) -> dict:
    samples: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):
            command = [sys.executable, "-m", "bench.memory", "--child", mode, "--models-dir", args.models_dir,
                       "--precision", args.precision, "--threads", str(args.threads), "--batch", str(args.batch),
                       "--passes", str(args.passes), "--variants", *args.variants]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{mode} child failed: {done.stderr.strip()[-2000:]}")
            samples[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}: {mode} measured", flush=True)
    names = list(samples["default"][0]["variants"])
    table = {mode: {name: {key: statistics.median(s["variants"][name][key] for s in samples[mode])
                           for key in ("ms", "faults")} for name in names} for mode in MODES}
    peak = {mode: statistics.median(s["peak_rss_bytes"] for s in samples[mode]) for mode in MODES}
    return {"table": table, "peak_rss_bytes": peak, "names": names}


def render(result: dict, args: argparse.Namespace) -> str:
    from bench.speed import machine

    table = result["table"]
    lines = [f"{machine()}; precision {args.precision}, {args.threads} threads, batch {args.batch} with the "
             f"manifest's TTA, median of {args.rounds} processes per mode × median of {args.passes} passes",
             "| variant | default ms / pass | faults / pass | retained ms / pass | faults / pass "
             "| retained vs default |",
             "|---|---|---|---|---|---|"]
    for name in result["names"]:
        d, r = table["default"][name], table["retained"][name]
        lines.append(f"| {name} | {d['ms']:.2f} | {d['faults']:,.0f} | {r['ms']:.2f} | {r['faults']:,.0f} | "
                     f"{d['ms'] / r['ms']:.2f}× |")
    peak = result["peak_rss_bytes"]
    lines.append(f"peak RSS of a child: default {peak['default'] / 2**20:.0f} MiB, retained "
                 f"{peak['retained'] / 2**20:.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prune-bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default="models")
    p.add_argument("--variants", nargs="+", default=["dense", "channel-keep0.75"])
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: the service's default (bf16 where the CPU has native bf16, else fp32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="images per request (each runs the TTA views)")
    p.add_argument("--passes", type=int, default=15, help="timed passes per variant and process")
    p.add_argument("--rounds", type=int, default=3, help="processes per mode")
    p.add_argument("--child", choices=MODES, dest="mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from app.settings import Settings

    args.precision = Settings(precision=args.precision).inference_precision()  # auto: the service's rule
    if args.mode:
        print(json.dumps(child(args)), flush=True)
        return 0
    print(render(run(args), args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
