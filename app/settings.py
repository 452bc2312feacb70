"""The service's one settings object: every knob is an environment variable (flags of `prune-serve` override)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.hardware import detect


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    models_dir: Path = Field(Path("models"), description="directory with manifest.json and the checkpoints")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, description="uvicorn worker processes (each loads every variant)")
    max_batch: int = Field(64, ge=1, description="most images in one micro-batched forward pass (1 = off)")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for more requests")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body")
    max_images: int = Field(64, ge=1, description="most images in one request")
    max_pixels: int = Field(16_000_000, ge=1024, description="largest width × height of one image")
    queue_size: int = Field(1024, ge=1, description="images waiting per variant before 503")
    torch_threads: int = Field(0, ge=0, description="intra-op threads for inference (0: torch default)")
    default_keep: float | None = Field(None, description="keep ratio used when a request names none (None: dense)")
    precision: str = Field("auto", description="inference precision: fp32, bf16, or auto (bf16 where the CPU "
                                               "has native bfloat16 units, AMX or AVX512-BF16; else fp32)")
    onnx_runtime: bool = Field(True, description="run a variant in ONNX Runtime at the batch sizes where it measured "
                                                 "faster than PyTorch (float32 only); false saves ~25 MB per variant")
    access_log: bool = Field(False, description="log every request (costs throughput under load)")
    latency_probe_runs: int = Field(20, ge=3, description="timed passes per batch size at start-up")

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

    def inference_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if native_bf16() else "fp32"


def native_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AMX or AVX512-BF16): the same rule as training."""
    return detect().cpu_native_bf16


@lru_cache
def get_settings() -> Settings:
    return Settings()
