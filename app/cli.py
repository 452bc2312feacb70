"""`prune-serve`: run the service with uvicorn (flags override the environment variables)."""

from __future__ import annotations

import signal

# Until uvicorn installs its graceful handlers, Ctrl-C ends the process at once, like SIGTERM does:
# nothing is served yet, and a KeyboardInterrupt raised inside `import torch` was seen to hang the
# process instead of ending it (measured: still alive 30 s after SIGINT, 1 s after launch).
signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse  # noqa: E402
import errno  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import uvicorn  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from app.registry import Registry, resident_memory_bytes  # noqa: E402
from app.settings import Settings  # noqa: E402


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound (None if it can): checked before anything slow starts, so a
    taken port ends the process at once with a clear message."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use (another prune-serve?); choose --port"
            return f"cannot bind {host}:{port}: {exc.strerror or exc}"
    return None


def check(settings: Settings) -> int:
    """Verify and load every variant (with the matching execution plan, if any), print the table."""
    from app.service import configure_process
    from core.model import TTA_VIEWS
    from engine import plan as plans

    key = configure_process(settings, settings.inference_precision())  # threads and allocator as the service's
    logging.getLogger("app.registry").setLevel(logging.CRITICAL)  # its problems are printed below, once
    registry = Registry(settings.models_dir, settings.inference_precision(), probe_runs=3,
                        onnx_runtime=settings.onnx_runtime)
    registry.load_models()
    if not registry.ready:
        print(f"prune-serve: models not servable: {registry.error}", file=sys.stderr)
        return 1
    found = registry.fitting_plan(settings.plan_directories(), key)
    for checked in registry.plan_checks:
        verdict = "fits this machine" if checked["fits"] else "does not fit this machine"
        print(f"plan {checked['plan']} {verdict} ({checked['variant']}: {checked['here_ms']} ms here, "
              f"{checked['plan_ms']} ms in the plan at {plans.CHECK_BATCH} images, "
              f"{TTA_VIEWS[plans.CHECK_TTA]} view(s))"
              + ("" if checked["fits"] else ": measuring instead"))
    plan, source = (found[0], str(found[1])) if found else (None, "")
    registry.optimise_all(plan, source)
    for v in registry.variants:
        print(f"{v.name:>24}  {v.granularity:<7} keep {v.keep:<5g} acc {v.test_acc_mean:6.2f}%  "
              f"{v.bytes:>10,} B on disk  {v.net.nbytes():>10,} B in memory  "
              f"batch-1 p50 {v.latency[1]['p50_ms']:.2f} ms  paths {v.net.path_summary()}")
    rss = resident_memory_bytes()
    print(f"{len(registry.variants)} variants, precision {registry.precision}, "
          f"figures from {found[1] if found else 'measurement now (no plan for this machine)'}"
          + (f", process RSS {rss / 2**20:.0f} MiB" if rss else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        env = Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        print(f"prune-serve: bad settings: {problems}", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="prune-serve", description=__doc__)
    p.add_argument("--host", default=env.host, help="bind address (HOST)")
    p.add_argument("--port", type=int, default=env.port, help="port (PORT)")
    p.add_argument("--workers", type=int, default=env.workers,
                   help="worker processes (WORKERS); each gets cores/workers threads unless TORCH_THREADS is set")
    p.add_argument("--models-dir", default=str(env.models_dir), help="models directory (MODELS_DIR)")
    p.add_argument("--check", action="store_true",
                   help="verify and load every variant, print the table, exit non-zero on any problem")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers < 1:
        p.error("--workers must be at least 1")

    # Settings are read from the environment inside every worker: pass the flags on that way.
    os.environ.update({"MODELS_DIR": args.models_dir, "HOST": args.host, "PORT": str(args.port),
                       "WORKERS": str(args.workers)})
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"prune-serve: bad settings: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    if args.check:
        return check(settings)

    problem = port_problem(args.host, args.port)
    if problem:
        print(f"prune-serve: {problem}", file=sys.stderr)
        return 1
    metrics_dir = None
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # One fresh directory per launch: workers write their metric values there, scrapes sum them.
        metrics_dir = tempfile.mkdtemp(prefix="prune-serve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                    timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)), log_level="info",
                    access_log=env.access_log, limit_concurrency=settings.limit_concurrency)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
