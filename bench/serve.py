"""Serving benchmark over real HTTP (loopback only).

1. Accuracy: sends the 10,000 CIFAR-10 test images (the original JPEG bytes) to a running server for
   every variant and compares the served accuracy with the manifest's figure for the same checkpoint
   (the release seed's test accuracy; the manifest's mean is over all seeds and is shown too).
2. Micro-batching: 32 concurrent clients sending one image per request, against a server with
   MAX_BATCH=64 and one with MAX_BATCH=1 (batching off); prints images/s and the ratio.

    prune-bench serve --data ../shared/data/cifar10-jpeg.tar.gz --models-dir models

It starts its own servers with `prune-serve` on 127.0.0.1 (on --port, and the unbatched one on a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

from bench.runs import save_run


def load_test_jpegs(path: Path, classes: list[str]) -> list[tuple[bytes, int]]:
    """(jpeg bytes, label) for every test image, read straight from the tarball or an ImageFolder."""
    items = []
    if path.is_file():
        with tarfile.open(path) as tar:
            for member in tar:
                parts = member.name.split("/")
                if member.isfile() and len(parts) >= 3 and parts[-3] == "test" and parts[-2] in classes:
                    items.append((member.name, tar.extractfile(member).read(), classes.index(parts[-2])))
    else:
        for label, cls in enumerate(classes):
            for file in sorted((path / "test" / cls).iterdir()):
                items.append((str(file), file.read_bytes(), label))
    items.sort()
    return [(data, label) for _, data, label in items]


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), for a server this process starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models_dir: str, port: int, **env: object) -> subprocess.Popen:
    """A prune-serve process on 127.0.0.1; keyword arguments set settings (max_batch=1 → MAX_BATCH=1),
    the rest (PRECISION, TORCH_THREADS, ...) come from this process's environment."""
    environment = {**os.environ, "MODELS_DIR": models_dir, "PORT": str(port), "HOST": "127.0.0.1",
                   **{key.upper(): str(value) for key, value in env.items()}}
    return subprocess.Popen([sys.executable, "-m", "app.cli"], env=environment, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


async def wait_ready(url: str, timeout: float = 300, process: subprocess.Popen | None = None) -> None:
    """Until /ready is 200; fails early if the server reports it cannot serve or ``process`` exits."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server exited with code {process.returncode}")
            try:
                r = await client.get(f"{url}/ready")
                if r.status_code == 200:
                    return
                if r.json().get("error"):
                    raise RuntimeError(f"server cannot serve: {r.json()['error']}")
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


async def served_accuracy(url: str, keep: float, images: list[tuple[bytes, int]], granularity: str = "weight",
                          per_request: int = 50,
                          concurrency: int = 4) -> float:
    correct = 0
    queue = [images[i:i + per_request] for i in range(0, len(images), per_request)]
    async with httpx.AsyncClient(timeout=120) as client:
        async def worker() -> None:
            nonlocal correct
            while queue:
                chunk = queue.pop()
                files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, (data, _) in enumerate(chunk)]
                r = await client.post(f"{url}/predict", params={"keep": keep, "top_k": 1,
                                                                 "granularity": granularity}, files=files)
                r.raise_for_status()
                correct += sum(p["index"] == label for p, (_, label) in zip(r.json()["predictions"], chunk))
        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return 100 * correct / len(images)


async def throughput(url: str, keep: float, images: list[tuple[bytes, int]], clients: int, seconds: float) -> dict:
    done, latencies, errors = 0, [], 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as client:
        async def worker(offset: int) -> None:
            nonlocal done, errors
            i = offset
            while time.perf_counter() < stop:
                data = images[i % len(images)][0]
                began = time.perf_counter()
                r = await client.post(f"{url}/predict", params={"keep": keep, "top_k": 1},
                                      files={"files": ("x.jpg", data, "image/jpeg")})
                latencies.append(time.perf_counter() - began)
                if r.status_code == 200:
                    done += 1
                else:
                    errors += 1
                i += clients
        began = time.perf_counter()
        await asyncio.gather(*[worker(k) for k in range(clients)])
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {"images_per_s": done / elapsed, "errors": errors, "p50_ms": 1e3 * statistics.median(latencies),
            "p95_ms": 1e3 * latencies[int(0.95 * (len(latencies) - 1))]}


def wrk_throughput(url: str, keep: float, image: bytes, clients: int, seconds: float) -> dict | None:
    """The same load from wrk (a C client, if installed): on a 2-core machine a Python client eats
    much of the CPU the server needs, so this measures the server rather than the client."""
    if shutil.which("wrk") is None:
        return None
    from bench.http import multipart_body, wrk  # here, not at the top: bench.http imports this module

    r = wrk(f"{url}/predict?keep={keep}&top_k=1", multipart_body([image]), clients, seconds)
    return {"images_per_s": r["requests_per_s"], "errors": r["errors"], "p50_ms": r["p50_ms"]}


async def main_async(args: argparse.Namespace) -> int:
    manifest = json.loads((Path(args.models_dir) / "manifest.json").read_text())
    images = load_test_jpegs(Path(args.data), manifest["classes"])
    release = manifest["training"]["release_seed"]
    keeps = args.keeps or [v["keep"] for v in manifest["variants"]]
    print(f"{len(images)} test images; variants: {keeps}")

    url = f"http://127.0.0.1:{args.port}"
    server = start_server(args.models_dir, args.port, max_batch=64, latency_probe_runs=5)
    try:
        await wait_ready(url, process=server)
        if args.skip_accuracy:
            keeps = []
        settings = httpx.get(f"{url}/variants").json()
        print("\n| variant | keep | served acc % | manifest acc % (release seed) | diff | manifest mean ± std |")
        print("|---|---|---|---|---|---|")
        rows = []
        for variant in manifest["variants"]:
            if variant["keep"] not in keeps:
                continue
            served = await served_accuracy(url, variant["keep"], images, variant.get("granularity", "weight"))
            expected = variant["test_acc_per_seed"][release]
            rows.append({"variant": variant["name"], "served_acc": served, "manifest_acc": expected})
            print(f"| {variant['name']} | {variant['keep']:g} | {served:.2f} | {expected:.2f} | "
                  f"{served - expected:+.2f} | {variant['test_acc_mean']:.2f} ± {variant['test_acc_std']:.2f} |",
                  flush=True)
        worst = max((abs(r["served_acc"] - r["manifest_acc"]) for r in rows), default=0.0)
        print(f"largest |served - manifest| = {worst:.2f} points (goal <= 0.3)")
        if args.save and rows:
            save_run(Path(args.save), "prune-bench serve " + " ".join(args.argv), Path(args.models_dir),
                     {r["variant"] for r in rows}, images=len(images), precision=settings["precision"],
                     tta=settings["tta"], rows=rows)
        batched = await throughput(url, args.throughput_keep, images, args.clients, args.seconds)
        batched_wrk = wrk_throughput(url, args.throughput_keep, images[0][0], args.clients, args.seconds)
    finally:
        server.terminate()
        server.wait(30)

    unbatched_port = free_port()  # not --port+1: an ephemeral client socket may hold that one
    unbatched_url = f"http://127.0.0.1:{unbatched_port}"
    server = start_server(args.models_dir, unbatched_port, max_batch=1, latency_probe_runs=5)
    try:
        await wait_ready(unbatched_url, process=server)
        unbatched = await throughput(unbatched_url, args.throughput_keep, images, args.clients, args.seconds)
        unbatched_wrk = wrk_throughput(unbatched_url, args.throughput_keep, images[0][0], args.clients, args.seconds)
    finally:
        server.terminate()
        server.wait(30)
    print(f"\nmicro-batching, keep={args.throughput_keep:g}, {args.clients} concurrent clients, 1 image/request, "
          f"{args.seconds:g}s each:")
    for name, r in (("MAX_BATCH=64", batched), ("MAX_BATCH=1 (off)", unbatched)):
        print(f"  {name:>18}: {r['images_per_s']:7.1f} images/s  p50 {r['p50_ms']:6.1f} ms  "
              f"p95 {r['p95_ms']:6.1f} ms  errors {r['errors']}")
    print(f"  ratio: {_ratio(batched, unbatched)} (goal >= 2x)  [Python httpx client]")
    if batched_wrk and unbatched_wrk:
        for name, r in (("MAX_BATCH=64", batched_wrk), ("MAX_BATCH=1 (off)", unbatched_wrk)):
            print(f"  {name:>18}: {r['images_per_s']:7.1f} images/s  p50 {r['p50_ms']:6.1f} ms  "
                  f"errors {r['errors']}  [wrk]")
        print(f"  ratio: {_ratio(batched_wrk, unbatched_wrk)} (goal >= 2x)  [wrk client]")
    else:
        print("  (install wrk for a measurement whose client does not compete for the server's CPU)")
    return 0


def _ratio(batched: dict, unbatched: dict) -> str:
    """Batched over unbatched throughput, or why there is none (a loaded machine may finish no unbatched
    request within --seconds)."""
    if not unbatched["images_per_s"]:
        return "not measured: no unbatched request finished in time (raise --seconds)"
    return f"{batched['images_per_s'] / unbatched['images_per_s']:.2f}x"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prune-bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="cifar10-jpeg.tar.gz or an ImageFolder root with test/")
    p.add_argument("--models-dir", default="models")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--keeps", type=float, nargs="*", help="variants to check (default: all)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--throughput-keep", type=float, default=1.0)
    p.add_argument("--skip-accuracy", action="store_true", help="only the micro-batching measurement")
    p.add_argument("--save", metavar="JSON", help="also write the accuracy rows (with machine, command and the "
                                                  "checkpoints measured) here, e.g. models/served-results.json "
                                                  "for `prune-bench readme`")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[2:] if argv is None else argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
