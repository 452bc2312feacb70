"""`prune-bench http`: serving speed over real HTTP on loopback, measured with wrk (a C load generator
that leaves the cores to the server), every ratio from one run on one machine.

For each server configuration (--workers × --max-batch), it starts `prune-serve` on 127.0.0.1, waits
until every variant has its execution plan, and for each variant × --clients × --images (images per
request, multipart) runs wrk for --seconds after a short warm-up. Prints images/s, latency
percentiles and errors, then the ratios: each variant vs the dense variant of the same server
(the service's own dense path, test-time augmentation included as served), and each configuration
vs the first one (e.g. MAX_BATCH=64 vs 1, or 2 workers vs 1). --tta requests other test-time
augmentation levels (?tta=); ×dense stays against dense at the served level.

    prune-bench http --variants dense channel-keep0.75 --clients 32 --images 64        # variants
    prune-bench http --variants dense --clients 1 32 --images 1 --max-batch 1 64      # micro-batching
    prune-bench http --variants dense --clients 32 --images 1 --workers 1 2          # workers
    prune-bench http --variants dense channel-keep0.75 --clients 4 --images 64 --tta 0 1 2   # TTA levels
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from bench.runs import save_run
from bench.serve import start_server
from bench.speed import machine
from core.model import TTA_LEVELS

WRK_SCRIPT = """
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary=benchboundary"
"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def sample_jpeg(index: int) -> bytes:
    """A 32×32 JPEG with some structure (no data set needed)."""
    image = Image.new("RGB", (32, 32), ((37 * index) % 256, (91 * index) % 256, (53 * index) % 256))
    for x in range(32):
        image.putpixel((x, (x * 7 + index) % 32), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def multipart_body(images: list[bytes]) -> bytes:
    """A multipart/form-data body (boundary ``benchboundary``) with ``images`` in the field ``files``."""
    parts = [b"--benchboundary\r\nContent-Disposition: form-data; name=\"files\"; filename=\"%d.jpg\"\r\n"
             b"Content-Type: image/jpeg\r\n\r\n" % i + data + b"\r\n" for i, data in enumerate(images)]
    return b"".join(parts) + b"--benchboundary--\r\n"


def multipart(images: int) -> bytes:
    return multipart_body([sample_jpeg(i) for i in range(images)])


def wrk(url: str, body: bytes, clients: int, seconds: float) -> dict:
    """One wrk run; requests/s, latency percentiles (ms), non-2xx responses and socket errors."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "body").write_bytes(body)
        (Path(tmp) / "post.lua").write_text(WRK_SCRIPT)
        out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--latency",
                              "--timeout", "30s", "-s", str(Path(tmp) / "post.lua"), url],
                             env={**os.environ, "BENCH_BODY": str(Path(tmp) / "body")},
                             capture_output=True, text=True, check=True).stdout
    result = {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for pct in ("50", "99"):
        found = re.search(rf"\b{pct}%\s+([\d.]+)(us|ms|s)\b", out)
        result[f"p{pct}_ms"] = float(found.group(1)) * UNITS[found.group(2)] if found else float("nan")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["errors"] = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sockets.groups())) if sockets else 0)
    return result


async def wait_planned(url: str, process: subprocess.Popen, timeout: float) -> float:
    """Seconds until /ready says every variant has its execution plan (figures loaded or measured)."""
    began = time.monotonic()
    async with httpx.AsyncClient() as client:
        while time.monotonic() - began < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with code {process.returncode}")
            try:
                body = (await client.get(f"{url}/ready")).json()
                if body.get("error"):
                    raise RuntimeError(f"server cannot serve: {body['error']}")
                if body.get("execution") == "done":
                    return time.monotonic() - began
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} not planned after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prune-bench http", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default="models")
    p.add_argument("--port", type=int, default=8770)
    p.add_argument("--variants", nargs="+", default=["dense"], help="variant names (as in /variants)")
    p.add_argument("--clients", type=int, nargs="+", default=[32], help="concurrent connections")
    p.add_argument("--images", type=int, nargs="+", default=[1], help="images per request")
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="server configurations: worker counts")
    p.add_argument("--max-batch", type=int, nargs="+", default=[64], help="server configurations: MAX_BATCH")
    p.add_argument("--tta", type=int, nargs="+", choices=TTA_LEVELS, default=None,
                   help="test-time augmentation levels to request (?tta=); default: the served level. ×dense is "
                        "always against dense at the served level")
    p.add_argument("--seconds", type=float, default=10, help="length of one wrk run")
    p.add_argument("--warmup", type=float, default=2, help="wrk warm-up before each server's runs")
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--save", metavar="JSON", help="also write the run (machine, command, every row) here, e.g. "
                                                  "models/http-results.json for `prune-bench readme`")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("prune-bench http needs wrk (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    if "dense" not in args.variants:
        args.variants.insert(0, "dense")

    command = "prune-bench http " + " ".join(argv if argv is not None else sys.argv[2:])
    print(f"{machine()}; wrk -t1 on loopback, {args.seconds:g} s per cell; command: {command}", flush=True)
    rows = []
    configs = [(w, b) for w in args.workers for b in args.max_batch]
    for workers, max_batch in configs:
        url = f"http://127.0.0.1:{args.port}"
        env = {"max_batch": max_batch, "workers": workers}
        process = start_server(args.models_dir, args.port, **env)
        try:
            took = asyncio.run(wait_planned(url, process, args.ready_timeout))
            table = httpx.get(f"{url}/variants").json()
            keeps = {v["name"]: (v["keep"], v["granularity"]) for v in table["variants"]}
            missing = [v for v in args.variants if v not in keeps]
            if missing:
                print(f"unknown variants {missing}; loaded: {sorted(keeps)}", file=sys.stderr)
                return 2
            print(f"\nworkers {workers}, MAX_BATCH {max_batch}: planned {took:.1f} s after launch "
                  f"({table['execution']['plan'] or 'measured at start-up'}), precision {table['precision']}, "
                  f"TTA {table['tta']}, {table['execution']['threads']} threads/worker", flush=True)
            wrk(f"{url}/predict?keep=1", multipart(1), 4, args.warmup)
            served = table["tta"]
            cells = [(name, level) for name in args.variants for level in (args.tta or [served])]
            if ("dense", served) not in cells:  # what ×dense compares with
                cells.insert(0, ("dense", served))
            for name, tta in cells:
                keep, granularity = keeps[name]
                target = f"{url}/predict?keep={keep}&granularity={granularity}&top_k=1&tta={tta}"
                for images in args.images:
                    body = multipart(images)
                    for clients in args.clients:
                        r = wrk(target, body, clients, args.seconds)
                        r.update(workers=workers, max_batch=max_batch, variant=name, images=images,
                                 clients=clients, images_per_s=r["requests_per_s"] * images, tta=tta, served=served)
                        rows.append(r)
                        print(f"  {name:>24} TTA {tta} {images:>3} img/req {clients:>3} clients: "
                              f"{r['images_per_s']:8.1f} images/s  p50 {r['p50_ms']:7.1f} ms  "
                              f"p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}", flush=True)
        finally:
            process.terminate()
            process.wait(30)

    print("\n| workers | MAX_BATCH | variant | TTA | images/request | clients | images/s | ×dense | ×first config | "
          "p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    first = configs[0]

    def twin(row: dict, **fields: object) -> dict:
        """The row measured like ``row`` except for ``fields``."""
        keys = ("workers", "max_batch", "variant", "tta", "images", "clients")
        return next(o for o in rows if all(o[k] == fields.get(k, row[k]) for k in keys))

    for r in rows:
        dense = twin(r, variant="dense", tta=r["served"])
        base = twin(r, workers=first[0], max_batch=first[1])
        print(f"| {r['workers']} | {r['max_batch']} | {r['variant']} | {r['tta']} | {r['images']} | {r['clients']} | "
              f"{r['images_per_s']:.1f} | {r['images_per_s'] / dense['images_per_s']:.2f} | "
              f"{r['images_per_s'] / base['images_per_s']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['errors']} |")
    if args.save:
        save_run(Path(args.save), command, Path(args.models_dir), {r["variant"] for r in rows},
                 seconds=args.seconds, rows=rows)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
