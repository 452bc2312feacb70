"""`prune-bench load`: load/soak over real HTTP (loopback only), bounded in count and time.

Soak: --requests requests from --clients concurrent clients, each request a random variant (both
granularities, every keep) and a random batch of 1–8 synthetic images. Reports errors by status,
p50/p95/p99 latency, requests/s and images/s, and the server's resident memory (RSS, from its
/metrics) when ready, after --warmup requests (allocator and oneDNN primitive caches fill on the
first use of each variant and batch shape) and after the soak; the goal is on the soak's growth.

Overload (--overload-seconds > 0): a second server with a small QUEUE_SIZE is flooded for that long;
it must answer 503 with Retry-After (never hang, never crash), then serve normally once load drops.

    prune-bench load --models-dir models --requests 10000 --clients 32

It starts its own `prune-serve` on 127.0.0.1 (or targets --url, which must be loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import statistics
import sys
import time
from collections import Counter
from urllib.parse import urlparse

import httpx
from PIL import Image

from app.registry import percentile
from bench.serve import free_port, start_server, wait_ready


def synthetic_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """Random 32×32 JPEGs: what clients send, without needing the data set."""
    rng = random.Random(seed)
    images = []
    for _ in range(count):
        image = Image.frombytes("RGB", (32, 32), bytes(rng.randrange(256) for _ in range(32 * 32 * 3)))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


async def server_rss(client: httpx.AsyncClient, url: str) -> float | None:
    text = (await client.get(f"{url}/metrics")).text
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1])
    return None


async def soak(client: httpx.AsyncClient, url: str, variants: list[dict], images: list[bytes], requests: int,
               clients: int, max_batch: int, deadline: float, seed: int) -> dict:
    rng = random.Random(seed)
    plan = [(rng.choice(variants), rng.randint(1, max_batch)) for _ in range(requests)]
    latencies: list[float] = []
    statuses: Counter = Counter()
    sent_images = 0
    cursor = 0

    async def worker() -> None:
        nonlocal cursor, sent_images
        while cursor < len(plan) and time.monotonic() < deadline:
            variant, batch = plan[cursor]
            cursor += 1
            files = [("files", (f"{i}.jpg", images[rng.randrange(len(images))], "image/jpeg")) for i in range(batch)]
            params = {"keep": variant["keep"], "granularity": variant["granularity"], "top_k": 1}
            began = time.perf_counter()
            try:
                r = await client.post(f"{url}/predict", params=params, files=files)
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - began)
                    sent_images += batch
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

    began = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(clients)])
    elapsed = time.perf_counter() - began
    done = sum(statuses.values())
    return {"requests": done, "planned": requests, "seconds": elapsed, "statuses": dict(statuses),
            "errors": done - statuses.get(200, 0), "requests_per_s": done / elapsed,
            "images_per_s": sent_images / elapsed,
            "p50_ms": percentile(latencies, 50) * 1e3, "p95_ms": percentile(latencies, 95) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3,
            "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else float("nan")}


async def overload(client: httpx.AsyncClient, url: str, image: bytes, clients: int, seconds: float) -> dict:
    """Flood with 8-image requests for ``seconds``; then check the server answers normally again."""
    statuses: Counter = Counter()
    retry_after_missing = 0
    deadline = time.monotonic() + seconds

    async def flood() -> None:
        nonlocal retry_after_missing
        files = [("files", (f"{i}.jpg", image, "image/jpeg")) for i in range(8)]
        while time.monotonic() < deadline:
            try:
                r = await client.post(f"{url}/predict", files=files, timeout=30)
                statuses[r.status_code] += 1
                if r.status_code == 503 and "retry-after" not in r.headers:
                    retry_after_missing += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

    await asyncio.gather(*[flood() for _ in range(clients)])
    await asyncio.sleep(1.0)
    after = Counter()
    for _ in range(20):  # load has dropped: one client, one image at a time
        r = await client.post(f"{url}/predict", files={"files": ("a.jpg", image, "image/jpeg")})
        after[r.status_code] += 1
    return {"statuses": dict(statuses), "retry_after_missing": retry_after_missing, "after": dict(after),
            "recovered": after.get(200, 0) == 20}


async def main_async(args: argparse.Namespace) -> int:
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        print("prune-bench load: --url must be a loopback address", file=sys.stderr)
        return 2
    limits = httpx.Limits(max_connections=max(args.clients, args.overload_clients) + 4)
    processes = []
    url = args.url or f"http://127.0.0.1:{args.port}"
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        try:
            if not args.url:
                processes.append(start_server(args.models_dir, args.port))
            await wait_ready(url, args.ready_timeout, processes[0] if processes else None)
            variants = (await client.get(f"{url}/variants")).json()["variants"]
            images = synthetic_jpegs(64)
            rss_ready = await server_rss(client, url)
            if args.warmup:  # first use of each variant × batch shape fills allocator and oneDNN caches
                await soak(client, url, variants, images, args.warmup, args.clients, args.max_batch,
                           time.monotonic() + args.max_seconds, args.seed + 1)
            rss_before = await server_rss(client, url)
            deadline = time.monotonic() + args.max_seconds
            result = await soak(client, url, variants, images, args.requests, args.clients, args.max_batch,
                                deadline, args.seed)
            rss_after = await server_rss(client, url)
            print(f"soak: {result['requests']:,} of {result['planned']:,} requests in {result['seconds']:.1f} s, "
                  f"{args.clients} clients, {len(variants)} variants (both granularities), 1-{args.max_batch} "
                  f"images per request")
            print(f"  statuses: {result['statuses']}  errors: {result['errors']} (goal 0)")
            print(f"  latency p50 {result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms, "
                  f"p99 {result['p99_ms']:.1f} ms; {result['requests_per_s']:.1f} requests/s, "
                  f"{result['images_per_s']:.1f} images/s")
            ok = result["errors"] == 0 and result["requests"] == result["planned"]
            if rss_before and rss_after:
                growth = rss_after / rss_before - 1
                print(f"  server RSS {rss_ready / 2**20:.0f} MiB when ready, {rss_before / 2**20:.0f} MiB after "
                      f"{args.warmup:,} warm-up requests, {rss_after / 2**20:.0f} MiB after the soak: "
                      f"{growth * 100:+.1f}% over the soak (goal < 10%)")
                ok = ok and growth < 0.10
            if args.overload_seconds > 0:
                port = free_port()
                processes.append(start_server(args.models_dir, port, queue_size=args.overload_queue_size,
                                              max_images=min(8, args.overload_queue_size), latency_probe_runs=3))
                over_url = f"http://127.0.0.1:{port}"
                await wait_ready(over_url, args.ready_timeout, processes[-1])
                flood = await overload(client, over_url, images[0], args.overload_clients, args.overload_seconds)
                alive = processes[-1].poll() is None
                print(f"overload: QUEUE_SIZE={args.overload_queue_size}, {args.overload_clients} clients x 8 images "
                      f"for {args.overload_seconds:g} s: {flood['statuses']}; 503 without Retry-After: "
                      f"{flood['retry_after_missing']}; server alive: {alive}; afterwards 20 single requests: "
                      f"{flood['after']} (recovered: {flood['recovered']})")
                bad = {k for k in flood["statuses"] if k not in (200, 503)}
                ok = ok and alive and flood["recovered"] and not bad and flood["retry_after_missing"] == 0 \
                    and flood["statuses"].get(503, 0) > 0
            print("PASS" if ok else "FAIL")
            return 0 if ok else 1
        finally:
            for process in processes:
                process.terminate()
                process.wait(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prune-bench load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default="models")
    p.add_argument("--url", help="target a running loopback server instead of starting one")
    p.add_argument("--port", type=int, default=8790, help="port of the started server (overload starts another "
                                                                "on a free port)")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8, help="images per request are drawn from 1..this")
    p.add_argument("--max-seconds", type=float, default=900, help="stop the soak after this long regardless")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2000,
                   help="requests before the RSS baseline (caches fill on first use of each shape)")
    p.add_argument("--overload-seconds", type=float, default=10, help="0: skip the overload phase")
    p.add_argument("--overload-clients", type=int, default=64)
    p.add_argument("--overload-queue-size", type=int, default=16,
                   help="QUEUE_SIZE of the flooded server (≥ 8: requests carry 8 images)")
    p.add_argument("--ready-timeout", type=float, default=300)
    return asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
