"""`prune-bench`: benchmarks (not tests). Each prints ratios measured in one run.

    prune-bench plan    measure the execution plan once and store it in models/plans/ (fast, stable start-up)
    prune-bench speed   in process: variants vs the service's dense variant and dense ONNX Runtime (default)
    prune-bench http    over HTTP with wrk: variants vs dense, workers, micro-batching on/off
    prune-bench startup time to /ready, exit on SIGTERM/SIGINT, taken port, keep=auto across starts
    prune-bench failover two replicas behind HAProxy: stop one under load, count failures, watch it rejoin
    prune-bench load    load/soak over HTTP: errors, latency percentiles, images/s, server RSS
    prune-bench serve   served accuracy over HTTP and the micro-batching ratio
    prune-bench memory  glibc's default allocator settings vs the service's retained freed memory
    prune-bench readme  README's results table from the manifest, the checkpoints and a saved http run
"""

from __future__ import annotations

import sys

COMMANDS = ("speed", "load", "serve", "plan", "http", "startup", "failover", "memory", "readme")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "speed"
    if command == "load":
        from bench.load import main as run
    elif command == "serve":
        from bench.serve import main as run
    elif command == "plan":
        from bench.plan import main as run
    elif command == "http":
        from bench.http import main as run
    elif command == "startup":
        from bench.startup import main as run
    elif command == "failover":
        from bench.failover import main as run
    elif command == "memory":
        from bench.memory import main as run
    elif command == "readme":
        from bench.readme import main as run
    else:
        from bench.speed import main as run
    return run(argv)


if __name__ == "__main__":
    raise SystemExit(main())
