"""The service's one settings object: every knob is an environment variable (flags of `prune-serve` override)."""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.hardware import detect


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    models_dir: Path = Field(Path("models"), description="directory with manifest.json and the checkpoints")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, description="uvicorn worker processes (each loads every variant)")
    max_batch: int = Field(64, ge=1, description="most images in one micro-batched forward pass (1 = off)")
    max_wait_ms: float = Field(0.0, ge=0, description="how long a batch waits for more requests once the variant is "
                                                      "idle (0: dispatch at once, batch only what queued meanwhile)")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body")
    max_images: int = Field(64, ge=1, description="most images in one request")
    max_pixels: int = Field(16_000_000, ge=1024, description="largest width × height of one image")
    queue_size: int = Field(1024, ge=1, description="images waiting per variant before 503")
    torch_threads: int = Field(0, ge=0, description="intra-op threads per worker for PyTorch, ONNX Runtime and the "
                                                    "sparse kernels (0: the usable cores / WORKERS)")
    default_keep: float | None = Field(None, description="keep ratio used when a request names none (None: dense)")
    auto_max_drop: float = Field(1.0, ge=0, le=100, description="keep=auto without max_drop or max_latency_ms: the "
                                                                "accuracy points it may lose")
    precision: str = Field("auto", description="inference precision: fp32, bf16, or auto (bf16 where the CPU "
                                               "has native bfloat16 units, AMX or AVX512-BF16; else fp32)")
    onnx_runtime: bool = Field(True, description="run a variant in ONNX Runtime at the batch sizes where it measured "
                                                 "faster than PyTorch (float32 only); false saves ~25 MB per variant")
    retain_freed_memory: bool = Field(True, description="let glibc keep freed activation buffers for reuse "
                                                        "(no page faults per pass: batch-64 passes ran ~1.4x faster "
                                                        "here; the process keeps its peak heap; with MAX_BATCH "
                                                        "above 64 no mmap at all). False: glibc's defaults, as do "
                                                        "MALLOC_* or GLIBC_TUNABLES set by you")
    access_log: bool = Field(False, description="log every request (costs throughput under load)")
    latency_probe_runs: int = Field(20, ge=3, description="timed passes per batch size when calibrating here")
    plan_dir: Path | None = Field(None, description="where the service stores the execution plan it measured when "
                                                    "models/plans/ had none for this machine, for the next start and "
                                                    "the other workers (default: PRUNE_CACHE_DIR/plans, else "
                                                    "~/.cache/gated-prune/plans, else the temp directory)")
    shutdown_grace_s: float = Field(2.0, ge=0, le=600, description="on SIGTERM/SIGINT, how long requests "
                                                                   "already accepted may take to finish")

    limit_concurrency: int = Field(256, ge=1, description="open connections and tasks beyond which uvicorn "
                                                         "answers 503 at once, before reading anything")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="a request not answered in this time (slow "
                                                                      "upload or long queue) gets 504")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated keys; when "
                                                     "set, every route but /health and /ready needs "
                                                     "Authorization: Bearer <key>")
    metrics_require_key: bool = Field(True, description="with API_KEYS: whether /metrics needs a key too (false "
                                                        "lets a Prometheus without credentials scrape it)")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _key_length(cls, value: list[str]) -> list[str]:
        if any(len(key) < 16 for key in value):
            raise ValueError("every API key must have at least 16 characters")
        return value

    @field_validator("default_keep")
    @classmethod
    def _keep_range(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError("DEFAULT_KEEP must be in (0, 1]")
        return value

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: str) -> str:
        if value not in ("auto", "fp32", "bf16"):
            raise ValueError("PRECISION must be auto, fp32 or bf16")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.queue_size < self.max_images:
            raise ValueError(f"QUEUE_SIZE={self.queue_size} is below MAX_IMAGES={self.max_images}: a request with "
                             "MAX_IMAGES images could never be queued")
        return self

    def threads(self) -> int:
        """Intra-op threads for this worker: TORCH_THREADS, else the usable cores shared among workers."""
        if self.torch_threads:
            return self.torch_threads
        return max(1, usable_cores() // self.workers)

    def plan_cache(self) -> Path | None:
        """The writable directory for plans measured here (None if there is none)."""
        return self.plan_dir or default_plan_cache()

    def plan_directories(self) -> list[Path]:
        """Where a plan for this machine is looked for, in order: models/plans, then the cache."""
        cache = self.plan_cache()
        return [self.models_dir / "plans"] + ([cache] if cache else [])

    def inference_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if native_bf16() else "fp32"


def native_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AMX or AVX512-BF16): the same rule as training."""
    return detect().cpu_native_bf16


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity, e.g. a container's cpuset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_plan_cache() -> Path | None:
    """The first writable of PRUNE_CACHE_DIR/plans, ~/.cache/gated-prune/plans, <tmp>/gated-prune-plans."""
    candidates = []
    if os.environ.get("PRUNE_CACHE_DIR"):
        candidates.append(Path(os.environ["PRUNE_CACHE_DIR"]) / "plans")
    candidates += [Path.home() / ".cache" / "gated-prune" / "plans", Path(tempfile.gettempdir()) / "gated-prune-plans"]
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK | os.X_OK):
                return path
        except OSError:
            continue
    return None


@lru_cache
def get_settings() -> Settings:
    return Settings()
