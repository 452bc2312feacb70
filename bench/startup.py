"""`prune-bench startup`: how fast `prune-serve` is ready, how fast it stops, and whether keep=auto
gives the same answer on every start. Real processes on 127.0.0.1, wall-clock times from launch.

1. --starts launches: seconds to `/ready` 200 and to every variant having its execution plan
   (`/ready` execution "done"); after each, the variant keep=auto chooses for every --max-drop and
   --max-latency-ms query (the same on every start is the goal).
2. Signals: SIGTERM and SIGINT sent --signal-after seconds after launch (during loading or
   calibration, whatever runs then); seconds until the process is gone (goal ≤ 3).
3. A taken port: seconds until prune-serve exits, its exit status and message (goal ≤ 5, non-zero).

    prune-bench startup --models-dir models                  # with the plans in models/plans/
    prune-bench startup --models-dir models --no-plan        # as on a machine no plan matches
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.serve import free_port
from bench.speed import machine


def launch(models_dir: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.cli", "--port", str(port), "--models-dir", models_dir],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def time_to(url: str, process: subprocess.Popen, began: float, timeout: float) -> tuple[float, float]:
    """(seconds to /ready 200, seconds to execution 'done')."""
    ready = None
    with httpx.Client(timeout=2) as client:
        while time.monotonic() - began < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}: {process.stderr.read()[-2000:]}")
            try:
                r = client.get(f"{url}/ready")
                body = r.json()
                if body.get("error"):
                    raise RuntimeError(body["error"])
                if r.status_code == 200 and ready is None:
                    ready = time.monotonic() - began
                if body.get("execution") == "done":
                    return ready or time.monotonic() - began, time.monotonic() - began
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"not planned after {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prune-bench startup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default="models")
    p.add_argument("--starts", type=int, default=3)
    p.add_argument("--max-drop", type=float, nargs="*", default=[0.1, 0.5, 1.0, 2.0, 5.0])
    p.add_argument("--max-latency-ms", type=float, nargs="*", default=[5.0, 20.0, 100.0])
    p.add_argument("--signal-after", type=float, nargs="*", default=[1.0, 4.0])
    p.add_argument("--no-plan", action="store_true",
                   help="serve a copy of the models without plans/ and with an empty plan cache")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="prune-startup-"))
    models_dir = args.models_dir
    if args.no_plan:
        models_dir = str(tmp / "models")
        shutil.copytree(args.models_dir, models_dir, ignore=shutil.ignore_patterns("plans"))
    ok = True
    print(f"{machine()}; command: prune-bench startup " + " ".join(argv if argv is not None else sys.argv[2:]))
    try:
        answers: list[dict] = []
        for start in range(args.starts):
            env = {"PLAN_DIR": str(tmp / f"cache-{start}")}  # no start reuses another's measured plan
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            began = time.monotonic()
            process = launch(models_dir, port, env)
            try:
                ready, planned = time_to(url, process, began, args.timeout)
                source = httpx.get(f"{url}/variants").json()["execution"]["plan"] or "measured at start-up"
                chosen = {f"max_drop={d:g}": auto(url, f"max_drop={d:g}") for d in args.max_drop}
                chosen |= {f"max_latency_ms={ms:g}": auto(url, f"max_latency_ms={ms:g}") for ms in args.max_latency_ms}
            finally:
                stop(process)
            answers.append(chosen)
            print(f"start {start + 1}: /ready 200 after {ready:.1f} s, every variant planned after {planned:.1f} s "
                  f"(figures: {source})", flush=True)
            ok = ok and ready <= 15
        queries = list(answers[0])
        stable = all(a == answers[0] for a in answers)
        print("\n| query | " + " | ".join(f"start {i + 1}" for i in range(len(answers))) + " |")
        print("|---|" + "---|" * len(answers))
        for q in queries:
            print(f"| keep=auto&{q} | " + " | ".join(a[q] for a in answers) + " |")
        print(f"keep=auto the same on every start: {stable}")
        ok = ok and stable

        for sig in (signal.SIGTERM, signal.SIGINT):
            for after in args.signal_after:
                process = launch(models_dir, free_port(), {"PLAN_DIR": str(tmp / "cache-signal")})
                time.sleep(after)
                began = time.monotonic()
                process.send_signal(sig)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                took = time.monotonic() - began
                ok = ok and took <= 3
                print(f"{sig.name} {after:g} s after launch: exited after {took:.2f} s "
                      f"(status {process.returncode}; goal ≤ 3 s)", flush=True)

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            began = time.monotonic()
            process = launch(models_dir, taken.getsockname()[1], {})
            _, err = process.communicate(timeout=60)
            took = time.monotonic() - began
        message = err.strip().splitlines()[-1] if err.strip() else ""
        ok = ok and process.returncode != 0 and took <= 5
        print(f"port in use: exit status {process.returncode} after {took:.2f} s (goal non-zero, ≤ 5 s): {message}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def auto(url: str, query: str) -> str:
    """The variant and TTA level keep=auto chooses for ``query`` (one tiny image)."""
    from bench.http import sample_jpeg

    r = httpx.post(f"{url}/predict?keep=auto&{query}", files={"files": ("x.jpg", sample_jpeg(0), "image/jpeg")},
                   timeout=60)
    return f"{r.json()['variant']['name']} (TTA {r.json()['tta']})" if r.status_code == 200 else f"{r.status_code}"


if __name__ == "__main__":
    raise SystemExit(main())
