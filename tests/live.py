"""A real `prune-serve` process on a free loopback port, for tests that need real HTTP and signals."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.serve import free_port

ROOT = Path(__file__).resolve().parent.parent


class LiveServer:
    def __init__(self, models_dir: Path, *args: str, port: int | None = None, **env: str) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "PRECISION": "fp32", "LATENCY_PROBE_RUNS": "3", "TORCH_THREADS": "1",
                       "PYTHONPATH": str(ROOT), **env}
        self.log = open(models_dir.parent / f"server-{self.port}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "--port", str(self.port), "--models-dir", str(models_dir), *args],
            cwd=ROOT, env=environment, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60, execution: str | None = None) -> dict:
        """Until /ready is 200 (and its execution status is ``execution``, if given) or names an error."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.output()}")
            try:
                r = httpx.get(f"{self.url}/ready", timeout=2)
                body = r.json()
                if body.get("error") or (r.status_code == 200 and execution in (None, body["execution"])):
                    return body
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s: {self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()
