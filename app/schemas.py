"""Response models: the documented API (visible in /docs and the OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    detail: str | list = Field(description="what is wrong with the request")


class ClassProbability(BaseModel):
    class_name: str = Field(alias="class", serialization_alias="class")
    index: int
    probability: float

    model_config = {"populate_by_name": True}


class VariantRef(BaseModel):
    name: str
    keep: float
    sparsity: float
    granularity: str


class Prediction(BaseModel):
    file: str = Field(description="the upload's file name (for raw bodies: 'body')")
    class_name: str = Field(alias="class", serialization_alias="class", description="predicted class")
    index: int = Field(description="predicted class index")
    probability: float
    top_k: list[ClassProbability]

    model_config = {"populate_by_name": True}


class PredictResponse(BaseModel):
    variant: VariantRef
    predictions: list[Prediction]
    inference_ms: float = Field(description="server-side time from decoded images to probabilities "
                                            "(queueing and the shared forward pass included)")


class Latency(BaseModel):
    p50_ms: float
    p95_ms: float
    images_per_s: float


class LayerExecution(BaseModel):
    layer: str
    channels: str = Field(description="output channels computed / channels in the dense network")
    density: float = Field(description="share of nonzero weights in the compacted layer")
    paths: dict[str, str] = Field(description="per batch size: dense conv or sparse (CSR) GEMM, as measured here")


class VariantRow(BaseModel):
    name: str
    keep: float
    sparsity: float
    granularity: str
    criterion: str
    finetuned: bool
    params: dict[str, int] = Field(description="total / prunable / nonzero parameter counts")
    checkpoint_bytes: int
    base_checkpoint: str | None = Field(None, description="checkpoint this variant is stored as a mask over "
                                                          "(needed to load it), if any")
    test_acc_mean: float = Field(description="CIFAR-10 test accuracy (%), mean over training seeds")
    test_acc_std: float
    test_acc_per_seed: list[float]
    drop: float = Field(description="accuracy points lost vs dense (mean over seeds)")
    latency: dict[str, Latency] = Field(description="measured by this process at start-up: batch_1, batch_8, "
                                                    "batch_64, on the execution path below")
    resident_bytes: int = Field(description="bytes this variant's compact network holds in memory (weights, "
                                            "sparse structures, ONNX graph)")
    execution: list[LayerExecution]
    backends: dict[str, str] = Field(description="per batch size: torch (with the per-layer paths) or onnxruntime, "
                                                 "whichever was measured faster here")


class VariantsResponse(BaseModel):
    classes: list[str]
    precision: str
    resident_memory_bytes: int | None = Field(None, description="this process's resident memory (RSS) now")
    variants: list[VariantRow]


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    ready: bool
    variants: int = 0
    error: str | None = None
