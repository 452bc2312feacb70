"""`prune-bench speed`: what pruning buys on this machine, in process, every variant against the
service's own dense variant and against dense ONNX Runtime, measured in one run.

Per variant: granularity, keep, accuracy (from the manifest), checkpoint bytes and their ratio to a
dense float32 checkpoint, images/s at batch 1 / 8 / 64 for the variant (the service's execution
path: engine/compact.py, calibrated here exactly as at service start-up), and the ratios to the two
honest baselines: the service's dense variant (compact, BN folded, its best measured backend: what
`keep=1` serves) and the dense network exported to ONNX and run by ONNX Runtime with its defaults.
The unfolded GatedNet (BN as separate layers, what earlier versions compared against) is timed for
reference only. Each layer's kept channels and path, and the largest output difference from the
masked dense model. Figures are per network pass, without the service's test-time augmentation
(which multiplies every variant's work alike); `prune-bench http` measures the same over HTTP.

Timing: every candidate is timed for ~--seconds per measurement, --repeats times, round-robin in an
order rotated every repeat (so drift and neighbours hit all alike); the median is reported. The ONNX
Runtime baseline runs with its defaults (busy-waiting threads) and is timed last, on its own, so its
spinning threads do not slow the others. Threads are pinned (--threads) for PyTorch and ONNX Runtime.

    prune-bench speed --models-dir models --threads 2
    prune-bench speed --precision bf16 --views --no-onnx --no-rss   # + TTA views: stacked vs one call each

``--views`` adds, per variant and batch, the served test-time augmentation (the manifest's level) run
as the service runs it (views stacked into calls of up to VIEW_ROWS_PER_CALL rows) against one forward
pass per view, the two timed alternately in one run.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from core import checkpoint
from core.hardware import autocast, retain_freed_memory
from core.model import TTA_VIEWS, GatedNet, tta_logits
from engine.compact import (
    BATCH_BUCKETS,
    VIEW_ROWS_PER_CALL,
    OnnxSession,
    calibrate,
    compact,
    onnxruntime_available,
)

Runner = Callable[[torch.Tensor], object]


def machine() -> str:
    """The CPU every figure was measured on: model, microarchitecture and instruction-set tier, e.g.
    "AMD EPYC (family 25 model 17, avx512_bf16)"."""
    from core.hardware import detect
    from engine.plan import isa_level

    caps = detect()
    return f"{caps.cpu_model} ({', '.join(filter(None, (caps.cpu_id, isa_level(caps))))})"


def images_per_second(run: Runner, x: torch.Tensor, seconds: float) -> float:
    """Images/s of ``run(x)`` over about ``seconds`` (at least 3 calls)."""
    began = time.perf_counter()
    calls = 0
    while calls < 3 or time.perf_counter() - began < seconds:
        run(x)
        calls += 1
    return calls * x.shape[0] / (time.perf_counter() - began)


def onnx_runner(model: GatedNet, threads: int) -> Runner | None:
    """The dense network exported to ONNX, run by ONNX Runtime with its default settings (its best
    case; outputs checked against PyTorch); None if onnxruntime is not installed."""
    if not onnxruntime_available():
        return None
    return OnnxSession(model, torch.randn(2, 3, 32, 32), threads, shared=False)


def dense_checkpoint_bytes(model: GatedNet) -> int:
    """Bytes of the dense network as a plain float32 inference checkpoint (the reference size)."""
    with tempfile.TemporaryDirectory() as tmp:
        return checkpoint.save_pruned(model, Path(tmp) / "dense.safetensors")[0]


def service_rss(models_dir: str, precision: str, onnx_runtime: bool = True, retain_memory: bool = True) -> int | None:
    """Resident memory of a fresh process that loads (and measures) every variant the way the service does."""
    code = ("import sys; from app.registry import Registry, resident_memory_bytes; "
            "from core.hardware import retain_freed_memory; "
            f"{retain_memory!r} and retain_freed_memory(); "
            f"r = Registry({models_dir!r}, {precision!r}, probe_runs=3, onnx_runtime={onnx_runtime!r}); r.load(); "
            "sys.exit(r.error) if not r.ready else print(resident_memory_bytes())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    retained = not args.no_retain_memory and retain_freed_memory()  # as the service runs, before any model loads
    models_dir = Path(args.models_dir)
    manifest = json.loads((models_dir / "manifest.json").read_text())
    entries = manifest["variants"]
    if args.variants:
        entries = [e for e in entries if e["name"] in args.variants or e["keep"] == 1.0]
    base_cache: dict = {}
    loaded = []
    for entry in entries:
        model = checkpoint.load_model(models_dir / entry["file"], entry["sha256"], root=models_dir,
                                      base_cache=base_cache)
        net = compact(model)
        if args.precision == "bf16":
            net = net.to(torch.bfloat16)
        calibrate(net)  # the same per-layer choice the service makes at start-up
        loaded.append((entry, model.to(memory_format=torch.channels_last), net))
    dense_entry, dense_model, _ = next(item for item in loaded if item[0]["keep"] == 1.0
                                       and item[0].get("granularity", "weight") == "weight")
    reference_bytes = dense_checkpoint_bytes(dense_model)

    def torch_dense(x: torch.Tensor) -> object:
        with torch.inference_mode(), autocast("cpu", args.precision):
            return dense_model(x)

    runners: dict[str, Runner] = {"unfolded GatedNet": torch_dense}
    ort_run = None if args.no_onnx else onnx_runner(dense_model, args.threads)
    if ort_run is not None:
        runners["dense ONNX Runtime"] = ort_run
    for entry, _, net in loaded:
        runners[entry["name"]] = lambda x, n=net: _infer(n, x)
    names = list(runners)

    speed: dict[str, dict[int, float]] = {n: {} for n in names}
    for batch in args.batches:
        x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        samples: dict[str, list[float]] = {n: [] for n in names}
        for name in names:
            runners[name](x)  # warm-up
        # ONNX Runtime's baseline keeps its default busy-waiting threads (its best case), which would keep
        # spinning into whatever runs next: it is timed on its own after the others.
        interleaved = [n for n in names if n != "dense ONNX Runtime"]
        for repeat in range(args.repeats):
            # Rotate the order every repeat: no candidate always runs right after the same neighbour.
            shift = repeat * len(interleaved) // max(1, args.repeats)
            for name in interleaved[shift:] + interleaved[:shift]:
                samples[name].append(images_per_second(runners[name], x, args.seconds))
        if "dense ONNX Runtime" in runners:
            for _ in range(args.repeats):
                samples["dense ONNX Runtime"].append(images_per_second(runners["dense ONNX Runtime"], x, args.seconds))
        for name in names:
            speed[name][batch] = statistics.median(samples[name])
        print(f"batch {batch}: measured", flush=True)

    # Exactness: every execution path against the masked model it came from (float32 only).
    probe = torch.randn(16, 3, 32, 32)
    rows = []
    for entry, model, net in loaded:
        with torch.inference_mode():
            diff = (_infer(net, probe).float() - model(probe)).abs().max().item()
        name = entry["name"]
        rows.append({
            "name": name, "granularity": entry.get("granularity", "weight"), "keep": entry["keep"],
            "test_acc_mean": entry["test_acc_mean"], "drop": entry["drop"], "bytes": entry["bytes"],
            "base": entry.get("base"), "bytes_ratio": entry["bytes"] / reference_bytes,
            "images_per_s": speed[name], "resident_bytes": net.nbytes(), "max_abs_diff": diff,
            "vs_dense": {b: speed[name][b] / speed[dense_entry["name"]][b] for b in args.batches},
            "vs_onnx": ({b: speed[name][b] / speed["dense ONNX Runtime"][b] for b in args.batches}
                        if ort_run is not None else None),
            "layers": net.describe(), "paths": net.path_summary(),
        })
    result = {"cpu": machine(), "precision": args.precision, "threads": args.threads, "memory_retained": retained,
              "repeats": args.repeats,
              "seconds": args.seconds, "batches": args.batches, "torch": torch.__version__,
              "reference_checkpoint_bytes": reference_bytes, "dense_images_per_s": speed[dense_entry["name"]],
              "unfolded_images_per_s": speed["unfolded GatedNet"],
              "onnx_images_per_s": speed.get("dense ONNX Runtime"), "variants": rows,
              "dense_name": dense_entry["name"]}
    if args.views:
        result["views"] = view_stacking(loaded, args.batches, manifest.get("tta", 0), args.repeats, args.seconds)
    if not args.no_rss:
        result["service_rss_bytes"] = service_rss(str(models_dir), args.precision, retain_memory=retained)
        result["service_rss_bytes_without_onnx"] = service_rss(str(models_dir), args.precision, onnx_runtime=False,
                                                               retain_memory=retained)
    return result


def view_stacking(loaded: list, batches: list[int], level: int, repeats: int, seconds: float) -> dict:
    """Images/s at TTA ``level`` with the views stacked as the service runs them, and with one forward pass
    per view, per variant and batch (alternating, median of ``repeats``)."""
    ways = {"stacked": VIEW_ROWS_PER_CALL, "per_view": 0}
    out: dict = {"level": level, "views": TTA_VIEWS[level], "rows_per_call": VIEW_ROWS_PER_CALL, "variants": {}}
    for entry, _, net in loaded:
        figures = out["variants"][entry["name"]] = {}
        runs = {way: functools.partial(_infer_tta, net, level=level, rows_per_call=rows) for way, rows in ways.items()}
        for batch in batches:
            x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            for run in runs.values():
                run(x)  # warm-up
            samples: dict[str, list[float]] = {way: [] for way in ways}
            for repeat in range(repeats):
                for way in (list(ways) if repeat % 2 == 0 else list(ways)[::-1]):
                    samples[way].append(images_per_second(runs[way], x, seconds))
            figures[batch] = {way: statistics.median(v) for way, v in samples.items()}
            difference = runs["stacked"](x).float() - runs["per_view"](x).float()
            figures[batch]["max_abs_diff"] = difference.abs().max().item()
        print(f"views: {entry['name']} measured", flush=True)
    return out


@torch.inference_mode()
def _infer_tta(net: torch.nn.Module, x: torch.Tensor, *, level: int, rows_per_call: int) -> torch.Tensor:
    return tta_logits(net, x, level, rows_per_call)


@torch.inference_mode()
def _infer(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(x)


def render(result: dict) -> str:
    batches = result["batches"]
    onnx = result["onnx_images_per_s"]
    memory = "retained" if result.get("memory_retained") else "returned to the OS (glibc defaults)"
    out = [f"{result['cpu']}; precision {result['precision']}, {result['threads']} threads, freed memory {memory}, "
           f"median of {result['repeats']} × {result['seconds']:g} s per cell, torch {result['torch']}",
           f"service dense ({result['dense_name']}, compact, BN folded, calibrated) images/s: "
           + ", ".join(f"b{b} {result['dense_images_per_s'][b]:.0f}" for b in batches),
           "unfolded GatedNet (reference only, not a baseline) images/s: "
           + ", ".join(f"b{b} {result['unfolded_images_per_s'][b]:.0f}" for b in batches)]
    if onnx:
        out.append("dense ONNX Runtime images/s: " + ", ".join(f"b{b} {onnx[b]:.0f}" for b in batches))
    out.append(f"dense float32 checkpoint: {result['reference_checkpoint_bytes']:,} B")
    head = "| variant | granularity | keep | test acc % | drop | checkpoint B | vs dense ckpt |"
    rule = "|---|---|---|---|---|---|---|"
    for b in batches:
        head += f" b{b} img/s | ×dense | ×ORT |"
        rule += "---|---|---|"
    out += ["", head + " max abs diff |", rule + "---|"]
    for row in result["variants"]:
        size = f"{row['bytes']:,}" + (" + base" if row["base"] else "")
        line = (f"| {row['name']} | {row['granularity']} | {row['keep']:g} | {row['test_acc_mean']:.2f} | "
                f"{row['drop']:+.2f} | {size} | {row['bytes_ratio'] * 100:.1f}% |")
        for b in batches:
            vs_onnx = f"{row['vs_onnx'][b]:.2f}" if row["vs_onnx"] else "-"
            line += f" {row['images_per_s'][b]:.0f} | {row['vs_dense'][b]:.2f} | {vs_onnx} |"
        out.append(line + f" {row['max_abs_diff']:.1e} |")
    out += ["", "Execution per layer (channels computed; per batch size: D dense conv, S CSR GEMM, X direct sparse):",
            "", "| variant | channels per conv | paths | in memory |", "|---|---|---|---|"]
    for row in result["variants"]:
        channels = " ".join(layer["channels"].split("/")[0] for layer in row["layers"])
        out.append(f"| {row['name']} | {channels} | {row['paths']} | {row['resident_bytes'] / 2**20:.1f} MiB |")
    if result.get("views"):
        views = result["views"]
        out += ["", f"TTA level {views['level']} ({views['views']} views per image): images/s with the views "
                    f"stacked into calls of up to {views['rows_per_call']} rows (as served) / one call per view, "
                    "the ratio, and the largest difference between the two ways' logits:",
                "", "| variant |" + "".join(f" b{b} stacked | b{b} per view | ×b{b} |" for b in batches)
                + " max abs diff |", "|---|" + "---|---|---|" * len(batches) + "---|"]
        for name, figures in views["variants"].items():
            out.append(f"| {name} |" + "".join(
                f" {figures[b]['stacked']:.0f} | {figures[b]['per_view']:.0f} | "
                f"{figures[b]['stacked'] / figures[b]['per_view']:.2f} |" for b in batches)
                + f" {max(figures[b]['max_abs_diff'] for b in batches):.1e} |")
    out += ["", *goals(result)]
    return "\n".join(out)


def goals(result: dict) -> list[str]:
    """The issue's goals, checked against this run's numbers."""
    rows = result["variants"]
    batches = result["batches"]
    lines = ["Goals (this run; ×dense = vs the service's own dense variant):"]
    slowest = min((row["vs_dense"][b], row["name"], b) for row in rows for b in batches)
    lines.append(f"- slowest variant vs dense: {slowest[0]:.2f}× ({slowest[1]}, batch {slowest[2]}); goal ≥ 0.95")
    within = [r for r in rows if r["drop"] <= 1.0]
    if within and 64 in batches:
        best = max(within, key=lambda r: r["images_per_s"][64])
        line = (f"- fastest within 1 point of dense: {best['name']} (drop {best['drop']:.2f}): "
                f"{best['vs_dense'][64]:.2f}× dense at batch 64 (goal ≥ 2), "
                f"{best['vs_dense'][batches[0]]:.2f}× at batch {batches[0]} (goal ≥ 1.5)")
        if best["vs_onnx"]:
            line += "; vs ONNX Runtime " + ", ".join(f"b{b} {best['vs_onnx'][b]:.2f}×" for b in batches)
            line += " (goal ≥ 1.0)"
        lines.append(line)
    for row in rows:
        if row["granularity"] == "weight" and row["keep"] == 0.05 and 64 in batches:
            lines.append(f"- weight keep 0.05: {row['vs_dense'][64]:.2f}× dense at batch 64 (goal ≥ 1.2)")
        if row["granularity"] == "weight" and row["keep"] == 0.1:
            lines.append(f"- weight keep 0.1 checkpoint: {row['bytes_ratio'] * 100:.1f}% of dense (goal ≤ 15%)")
    bigger = [r["name"] for r in rows if r["bytes"] > result["reference_checkpoint_bytes"]]
    lines.append(f"- variants bigger than the dense checkpoint: {', '.join(bigger) or 'none'}")
    worst = max(rows, key=lambda r: r["max_abs_diff"])
    lines.append(f"- largest output difference from the masked model: {worst['max_abs_diff']:.1e} ({worst['name']})"
                 + (" (goal ≤ 1e-4, float32)" if result["precision"] == "fp32" else " (bf16: not an fp32 check)"))
    if result.get("service_rss_bytes"):
        in_memory = sum(r["resident_bytes"] for r in rows)
        lines.append(f"- service RSS with all {len(rows)} variants loaded: {result['service_rss_bytes'] / 2**20:.0f} "
                     f"MiB (their compact networks: {in_memory / 2**20:.1f} MiB); with ONNX_RUNTIME=false: "
                     f"{(result.get('service_rss_bytes_without_onnx') or 0) / 2**20:.0f} MiB")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prune-bench speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default="models")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for PyTorch and ONNX Runtime")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCH_BUCKETS))
    p.add_argument("--repeats", type=int, default=5, help="measurements per cell (median reported)")
    p.add_argument("--seconds", type=float, default=0.3, help="length of one measurement")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="PyTorch precision (ONNX Runtime always runs float32)")
    p.add_argument("--variants", nargs="*", help="names to include (dense is always included)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime baseline")
    p.add_argument("--views", action="store_true",
                   help="also time the served TTA with stacked views against one call per view")
    p.add_argument("--no-rss", action="store_true", help="skip the service memory measurement")
    p.add_argument("--no-retain-memory", action="store_true",
                   help="glibc's allocator defaults (as RETAIN_FREED_MEMORY=false); see prune-bench memory")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    result = run(args)
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
