"""`prune-serve`: run the service with uvicorn (flags override the environment variables)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn

from app.registry import Registry, resident_memory_bytes
from app.settings import Settings


def main(argv: list[str] | None = None) -> int:
    env = Settings()
    p = argparse.ArgumentParser(prog="prune-serve", description=__doc__)
    p.add_argument("--host", default=env.host, help="bind address (HOST)")
    p.add_argument("--port", type=int, default=env.port, help="port (PORT)")
    p.add_argument("--workers", type=int, default=env.workers, help="worker processes (WORKERS)")
    p.add_argument("--models-dir", default=str(env.models_dir), help="models directory (MODELS_DIR)")
    p.add_argument("--check", action="store_true",
                   help="verify and load every variant, print the table, exit non-zero on any problem")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.check:
        registry = Registry(args.models_dir, env.inference_precision(), probe_runs=3, onnx_runtime=env.onnx_runtime)
        registry.load()
        if not registry.ready:
            print(f"prune-serve: models not servable: {registry.error}", file=sys.stderr)
            return 1
        for v in registry.variants:
            print(f"{v.name:>24}  {v.granularity:<7} keep {v.keep:<5g} acc {v.test_acc_mean:6.2f}%  "
                  f"{v.bytes:>10,} B on disk  {v.net.nbytes():>10,} B in memory  "
                  f"batch-1 p50 {v.latency[1]['p50_ms']:.2f} ms  paths {v.net.path_summary()}")
        rss = resident_memory_bytes()
        print(f"{len(registry.variants)} variants, precision {registry.precision}, "
              f"process RSS {rss / 2**20:.0f} MiB" if rss else "")
        return 0

    # Settings are read from the environment inside every worker: pass the flags on that way.
    os.environ.update({"MODELS_DIR": args.models_dir, "HOST": args.host, "PORT": str(args.port)})
    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                timeout_graceful_shutdown=30, log_level="info", access_log=env.access_log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
