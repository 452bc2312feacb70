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
    tta: int = Field(description="the test-time augmentation level these probabilities were computed at")
    predictions: list[Prediction]
    inference_ms: float = Field(description="server-side time from decoded images to probabilities "
                                            "(queueing and the shared forward pass included)")
    latency_budget_met: bool | None = Field(None, description="keep=auto with max_latency_ms: whether the chosen "
                                                              "variant's estimate fit the budget (false: none did, "
                                                              "this is the fastest; null: not measured yet)")
    estimated_ms: float | None = Field(None, description="keep=auto with max_latency_ms: the estimate it was "
                                                         "chosen by (measured p95 at the queue depth it met)")


class Latency(BaseModel):
    p50_ms: float
    p95_ms: float
    images_per_s: float


class TtaLevel(BaseModel):
    views: int = Field(description="forward passes per image at this level")
    test_acc_mean: float | None = Field(description="CIFAR-10 test accuracy (%) at this level, mean over training "
                                                    "seeds (null: training did not record it)")
    latency: dict[str, Latency] = Field(description="as `latency`, at this level (empty until measured or loaded "
                                                    "from a plan)")
    pareto: bool = Field(description="this variant at this level is Pareto-optimal among every variant at every "
                                     "level (keep=auto only answers with these)")


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
    latency: dict[str, Latency] = Field(description="batch_1, batch_8, batch_64 (images per forward pass, "
                                                    "before test-time augmentation views), on the execution path "
                                                    "below; empty until measured or loaded from a plan")
    tta_levels: dict[str, TtaLevel] = Field(description="per test-time augmentation level a request may choose "
                                                        "(POST /predict?tta=): its views, accuracy and latency")
    latency_source: str | None = Field(None, description="'plan: <file>' (measured earlier on this kind of machine "
                                                          "by prune-bench plan or another start), 'measured at "
                                                          "start-up', or null while the variant still runs on its "
                                                          "compact dense path unmeasured")
    macs_per_image: int = Field(description="multiply-adds per view on the compact dense path")
    pareto: bool = Field(description="at the served TTA level, no variant at any level is both more accurate and "
                                     "faster (tta_levels has the same for every level; keep=auto only picks these)")
    resident_bytes: int = Field(description="bytes this variant's compact network holds in memory (weights, "
                                            "sparse structures, ONNX graph)")
    execution: list[LayerExecution]
    backends: dict[str, str] = Field(description="per batch size: torch (with the per-layer paths) or onnxruntime, "
                                                 "whichever was measured faster here")


class PlanCheck(BaseModel):
    plan: str = Field(description="the execution plan file checked")
    variant: str | None = Field(description="the variant timed (its first one with a figure at the check point)")
    plan_ms: float | None = Field(description="the plan's fastest pass there: batch 8, 1 view (its median in a "
                                              "plan that predates fastest passes)")
    here_ms: float | None = Field(description="the same on this machine before the plan is used: the fastest of 9 "
                                              "passes (traffic served meanwhile can only slow a pass)")
    fits: bool = Field(description="within 1.5x either way: the plan is used; else it is ignored and this "
                                   "machine measures its own")


class Execution(BaseModel):
    status: str = Field(description="dense (serving on compact dense paths, figures pending), checking plan, "
                                    "applying plan, calibrating, waiting for plan (another worker calibrates), done")
    plan: str | None = Field(description="the execution plan file in use, if any")
    key: dict = Field(description="what plans are matched on: CPU model, instruction set, torch, precision, threads")
    threads: int = Field(description="intra-op threads of this worker")
    memory_retained: bool = Field(description="glibc keeps freed activation buffers for reuse (RETAIN_FREED_MEMORY, "
                                              "see core/hardware.py); false: the C library's defaults")
    auto_speed_basis: str = Field(description="what keep=auto ranks speed by: measured (batch-64 throughput) or "
                                              "compute (multiply-adds, until every variant is measured)")
    plan_checks: list[PlanCheck] = Field(description="each matching plan's speed check at start-up, in order")


class VariantsResponse(BaseModel):
    classes: list[str]
    precision: str
    tta: int = Field(0, description="test-time augmentation level served when a request does not choose one "
                                    "(0: none); each row's test_acc_mean, drop and latency are at this level")
    execution: Execution
    resident_memory_bytes: int | None = Field(None, description="this process's resident memory (RSS) now")
    variants: list[VariantRow]


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    ready: bool
    variants: int = 0
    error: str | None = None
    execution: str = Field("loading", description="loading, failed, dense, checking plan, applying plan, "
                                                  "calibrating, waiting for plan, done (see /variants)")
