"""Garbage-collector pauses of the service under load: runs `prune-serve` in this process with a
`gc.callbacks` hook timing every collection, drives it with wrk for --seconds, and prints wrk's latency
percentiles next to each generation's collections and pauses.

    python scripts/gc_pauses.py --query "keep=0.25&granularity=channel&tta=0" --clients 4 --images 64

Needs wrk. Run it from the repository root (MODELS_DIR defaults to models).
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.http import WRK_SCRIPT, multipart  # noqa: E402

pauses: dict[int, list[float]] = collections.defaultdict(list)
_began = [0.0]


def _time_collections(phase: str, info: dict) -> None:
    if phase == "start":
        _began[0] = time.perf_counter()
    else:
        pauses[info["generation"]].append((time.perf_counter() - _began[0]) * 1e3)


def _drive(args: argparse.Namespace) -> None:
    url = f"http://127.0.0.1:{args.port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/ready").json().get("execution") == "done":
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    with tempfile.TemporaryDirectory() as tmp:
        body, script = Path(tmp) / "body", Path(tmp) / "post.lua"
        body.write_bytes(multipart(args.images))
        script.write_text(WRK_SCRIPT)
        command = ["wrk", "-t1", f"-c{args.clients}", f"-d{args.seconds}s", "--latency", "-s", str(script),
                   f"{url}/predict?{args.query}&top_k=1"]
        env = {**os.environ, "BENCH_BODY": str(body)}
        subprocess.run([*command[:3], "-d2s", *command[4:]], capture_output=True, env=env)  # warm-up
        for generation in pauses:
            pauses[generation].clear()  # start-up and warm-up collections are not the load's
        out = subprocess.run(command, capture_output=True, text=True, env=env)
    print(f"{args.clients} clients × {args.images} images, {args.seconds} s, /predict?{args.query}; "
          f"objects frozen out of the collector's view: {gc.get_freeze_count():,}")
    print("\n".join(line for line in out.stdout.splitlines()
                     if ("%" in line and "ms" in line) or "Requests/sec" in line))
    for generation, times in sorted(pauses.items()):
        times.sort()
        print(f"gen{generation}: {len(times)} collections, {sum(times):.0f} ms in all, longest {times[-1]:.1f} ms"
              if times else f"gen{generation}: no collections")
    os.kill(os.getpid(), 15)  # prune-serve's own shutdown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--query", default="keep=0.25&granularity=channel&tta=0")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--port", type=int, default=8125)
    args = p.parse_args()
    gc.callbacks.append(_time_collections)
    threading.Thread(target=_drive, args=(args,), daemon=True).start()
    from app.cli import main as serve

    serve(["--port", str(args.port)])


if __name__ == "__main__":
    main()
