"""Saved benchmark runs: what `prune-bench readme` writes the README's and docs' measured tables from.

A run names its machine, cores, command, date and the checkpoints it measured (sha256), so figures of other
models (e.g. from before a rebuild) are refused instead of being shown next to the manifest's.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bench.speed import machine


def save_run(path: Path, command: str, models_dir: Path, measured: set[str], **fields: object) -> None:
    """Write ``fields`` (rows, settings) with where and on which checkpoints they were measured."""
    manifest = json.loads((models_dir / "manifest.json").read_text())
    run = {"machine": machine(), "cores": len(os.sched_getaffinity(0)), "command": command,
           "date": time.strftime("%Y-%m-%d", time.gmtime()),
           "checkpoints": {v["name"]: v["sha256"] for v in manifest["variants"] if v["name"] in measured},
           **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run, indent=1) + "\n")
    print(f"saved to {path}")


def stale_checkpoints(run: dict, shipped: dict[str, str]) -> list[str]:
    """Variants the run measured with other checkpoints than ``shipped`` (name → sha256) has; ["not
    recorded"] when the run does not say which it measured."""
    if "checkpoints" not in run:
        return ["not recorded"]
    return sorted(name for name, sha in run["checkpoints"].items() if shipped.get(name) != sha)
