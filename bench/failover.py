"""`prune-bench failover`: the replica story on one machine. Two `prune-serve` replicas behind HAProxy
(health checks on /ready, retries of failed idempotent requests on the other replica); a bounded load
runs while replica A is stopped (SIGTERM) and later started again. Prints how many requests failed
(the goal is none), what each replica served in each phase, and when A rejoined. The load runs for
--seconds and, past that, until A has served through the balancer again (at most --rejoin-timeout after
A is ready), so a slow start-up on a loaded machine is reported as slow rather than as a lost replica.

    prune-bench failover --models-dir models            # needs haproxy (Debian: apt-get install haproxy)

POST /predict is a pure function of its input, so the balancer may retry it: `retry-on
all-retryable-errors` with `option redispatch` sends a request that met a refused connection, an
empty response or a 503 from a stopping replica to the other one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.http import sample_jpeg
from bench.serve import free_port, wait_ready
from bench.speed import machine

HAPROXY_CFG = """
global
    maxconn 256
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch 1
    option http-buffer-request
    retry-on all-retryable-errors
frontend web
    bind 127.0.0.1:{front}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /ready
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
    server a 127.0.0.1:{a} check
    server b 127.0.0.1:{b} check
"""


def launch(models_dir: str, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.cli", "--port", str(port), "--models-dir", models_dir],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=dict(os.environ))


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def served(port: int) -> int | None:
    """Requests this replica answered with 200 (its Prometheus counter); None if it is down."""
    try:
        text = httpx.get(f"{url(port)}/metrics", timeout=2).text
    except httpx.HTTPError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("prune_requests_total{") and 'status="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def served_by_each(ports: dict[str, int]) -> dict[str, int | None]:
    return {name: served(port) for name, port in ports.items()}


async def run(args: argparse.Namespace, tmp: Path) -> int:
    ports = {"a": free_port(), "b": free_port()}
    front = free_port()
    replicas = {name: launch(args.models_dir, port, tmp / f"{name}.log") for name, port in ports.items()}
    balancer = None
    try:
        await asyncio.gather(*(wait_ready(url(ports[name]), 120, process) for name, process in replicas.items()))
        (tmp / "haproxy.cfg").write_text(HAPROXY_CFG.format(front=front, **ports))
        balancer = subprocess.Popen(["haproxy", "-f", str(tmp / "haproxy.cfg"), "-db"],
                                    stdout=(tmp / "haproxy.log").open("wb"), stderr=subprocess.STDOUT)
        await asyncio.sleep(1.5)  # first health checks
        image = sample_jpeg(3)
        results: list[tuple[float, str]] = []  # (seconds since start, outcome)
        began = time.monotonic()
        finished = asyncio.Event()

        async def client_loop(client: httpx.AsyncClient) -> None:
            while not finished.is_set():
                try:
                    r = await client.post(f"{url(front)}/predict?keep=1",
                                          files={"files": ("x.jpg", image, "image/jpeg")})
                    outcome = "200" if r.status_code == 200 else str(r.status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                results.append((time.monotonic() - began, outcome))

        events: dict[str, float] = {}
        counts: dict[str, dict[str, int | None]] = {}

        async def until_a_serves(seconds: float) -> bool:
            """Wait (at most ``seconds``) until the balancer has sent replica A a request it answered."""
            give_up = time.monotonic() + seconds
            while time.monotonic() < give_up:
                if await asyncio.to_thread(served, ports["a"]):
                    return True
                await asyncio.sleep(0.1)
            return False

        async def choreography() -> None:
            await asyncio.sleep(args.stop_after)
            # Stop A only once it is seen in rotation: on a loaded machine the first requests may all
            # still be in flight at --stop-after, and stopping an idle replica proves nothing.
            await until_a_serves(args.rejoin_timeout)
            counts["before stop"] = await asyncio.to_thread(served_by_each, ports)
            events["A stopped (SIGTERM)"] = time.monotonic() - began
            replicas["a"].send_signal(signal.SIGTERM)
            await asyncio.to_thread(replicas["a"].wait, 30)
            events["A exited"] = time.monotonic() - began
            await asyncio.sleep(args.restart_after)
            events["A started again"] = time.monotonic() - began
            replicas["a"] = launch(args.models_dir, ports["a"], tmp / "a.log")
            await wait_ready(url(ports["a"]), 120, replicas["a"])
            events["A ready"] = time.monotonic() - began
            if await until_a_serves(args.rejoin_timeout):  # rejoined = the balancer sends it requests again
                events["A served again through the balancer"] = time.monotonic() - began
            await asyncio.sleep(max(0.0, began + args.seconds - time.monotonic()))

        async def conduct() -> None:
            try:
                await choreography()
            finally:
                finished.set()  # the clients stop with the choreography, also when it fails

        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=args.clients)) as client:
            await asyncio.gather(conduct(), *(client_loop(client) for _ in range(args.clients)))
        elapsed = time.monotonic() - began
        counts["end (A since its restart)"] = served_by_each(ports)
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(10)
        for process in replicas.values():
            if process.poll() is None:
                process.terminate()
                process.wait(30)

    failed = [(t, o) for t, o in results if o != "200"]
    print(f"{machine()}; command: prune-bench failover " + " ".join(sys.argv[2:]))
    print(f"load: {args.clients} clients, one image per request, keep=1, {elapsed:.1f} s through HAProxy "
          f"(health check GET /ready every 500 ms, fall 2 / rise 2, retry-on all-retryable-errors, redispatch)")
    for name, at in events.items():
        print(f"  {at:6.2f} s  {name}")
    for name, by_replica in counts.items():
        print(f"  served so far, {name}: A {by_replica['a']}, B {by_replica['b']}")
    print(f"requests: {len(results)}, failed: {len(failed)} (goal 0)"
          + (f"; first failures: {failed[:5]}" if failed else ""))
    rejoined = "A served again through the balancer" in events
    print(f"A rejoined: {rejoined}")
    ok = not failed and rejoined and bool(counts["before stop"]["a"])
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prune-bench failover", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default="models")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=25)
    p.add_argument("--stop-after", type=float, default=5,
                   help="seconds of load before replica A is stopped (not before it has served a request)")
    p.add_argument("--restart-after", type=float, default=5, help="seconds A stays down")
    p.add_argument("--rejoin-timeout", type=float, default=30,
                   help="how long to wait for the balancer to use A: before A is stopped, and again after "
                        "it is ready")
    args = p.parse_args(argv)
    if shutil.which("haproxy") is None:
        print("prune-bench failover needs haproxy (Debian: apt-get install haproxy)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="prune-failover-") as tmp:
        return asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    raise SystemExit(main())
