"""The trade-off table and plot."""

from __future__ import annotations

import gzip
import io
import json

import torch
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from app.registry import Variant, resident_memory_bytes
from app.schemas import ErrorResponse, VariantsResponse
from app.service import Service, get_ready_service
from core.model import TTA_VIEWS
from core.plot import plot_tradeoff
from engine.export import ExportError, export_compact

router = APIRouter(tags=["variants"])
NOT_READY = {503: {"model": ErrorResponse, "description": "models not loaded"}}


@router.get("/variants", response_model=VariantsResponse, responses=NOT_READY,
            summary="One row per variant: size, accuracy (from training) and latency (measured here)")
async def variants(service: Service = Depends(get_ready_service)) -> dict:
    registry = service.registry
    basis = registry.speed_basis()
    pareto = {c.key for c in registry.pareto(basis)}
    return {"classes": registry.classes, "precision": registry.precision, "tta": registry.tta,
            "resident_memory_bytes": resident_memory_bytes(),
            "execution": {"status": service.execution, "plan": service.plan_source, "key": service.plan_key,
                          "threads": torch.get_num_threads(), "memory_retained": service.plan_key["memory_retained"],
                          "auto_speed_basis": basis, "plan_checks": registry.plan_checks},
            "variants": [_row(v, registry.tta, pareto) for v in registry.variants]}


def _row(variant: Variant, served: int, pareto: set[tuple[str, int]]) -> dict:
    """A variant's row; ``pareto`` marks the (variant, TTA level) choices keep=auto may answer with."""
    row = variant.describe()
    for level, figures in row["tta_levels"].items():
        figures["pareto"] = (variant.name, int(level)) in pareto
    return row | {"pareto": (variant.name, served) in pareto}


@router.get("/variants/plot", responses={200: {"content": {"image/png": {}}}, **NOT_READY},
            response_class=Response, summary="Accuracy vs sparsity with every variant's measured latency, and "
                                             "accuracy vs measured speed at every TTA level (PNG)")
async def variants_plot(service: Service = Depends(get_ready_service)) -> Response:
    """Rendered once per set of figures (they change only while plans are applied or measured),
    then served from memory."""
    registry = service.registry
    latency = [{"granularity": v.granularity, "sparsity": v.sparsity, "ms": v.latency[1]["p50_ms"]}
               for v in registry.variants if 1 in v.latency]
    choices = []
    if registry.speed_basis() == "measured":  # accuracy vs speed once every variant has measured figures
        front = {c.key for c in registry.pareto("measured")}
        choices = [{"granularity": c.variant.granularity, "tta": c.tta, "views": TTA_VIEWS[c.tta],
                    "accuracy": registry.accuracy(c.variant, c.tta),
                    "images_per_s": registry.speed(c.variant, "measured", c.tta),
                    "pareto": c.key in front} for c in registry.choices("measured")]
    key = repr((latency, choices))
    cached = service.plot_cache
    if cached is None or cached[0] != key:
        table = registry.manifest.get("sweep") or [
            {"criterion": "dense" if v.keep == 1.0 else v.criterion, "finetuned": v.finetuned, "keep": v.keep,
             "sparsity": v.sparsity, "test_acc_mean": v.test_acc_mean, "test_acc_std": v.test_acc_std}
            for v in registry.variants
        ]

        def render() -> bytes:
            buffer = io.BytesIO()
            plot_tradeoff(table, buffer, latency_ms=latency, choices=choices)
            return buffer.getvalue()

        cached = service.plot_cache = (key, await run_in_threadpool(render))
    return Response(cached[1], media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.get("/variants/{name}/onnx", responses={200: {"content": {"application/octet-stream": {}}},
                                               404: {"model": ErrorResponse, "description": "no such variant"},
                                               **NOT_READY},
            response_class=Response, summary="The variant's compact network as an ONNX file (edge export)")
async def variant_onnx(name: str, request: Request, service: Service = Depends(get_ready_service)) -> Response:
    """float32, dynamic batch, opset pinned, no test-time augmentation; verified against PyTorch with
    ONNX Runtime (1e-4) when first asked for, then kept (see engine/export.py for the input format).
    Sent gzip-compressed to clients that accept it: a weight-pruned network is dense-shaped in ONNX,
    and its zeros compress (keep 0.1: 7.9 MB → 1.0 MB)."""
    variant = next((v for v in service.registry.variants if v.name == name), None)
    if variant is None:
        raise HTTPException(404, detail=f"no variant named {name!r}; see GET /variants")
    data = service.onnx_files.get(name)
    if data is None:
        metadata = {"variant": name, "classes": json.dumps(service.registry.classes),
                    "normalization": json.dumps({"mean": service.registry.mean, "std": service.registry.std}),
                    "input": "float32 [N,3,32,32]: RGB/255, minus mean, divided by std"}
        try:
            # In the inference thread, like every tensor operation of the service (see app/batching.py)
            net = await service.in_inference_thread(service.registry.float32_net, variant)  # not the bf16 copy
            data = await service.in_inference_thread(export_compact, net, metadata)
        except (ExportError, ImportError) as exc:
            raise HTTPException(503, detail=f"ONNX export unavailable here: {exc}") from exc
        service.onnx_files[name] = data = (data, await run_in_threadpool(gzip.compress, data, 6))
    headers = {"Content-Disposition": f'attachment; filename="{name}.onnx"', "Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("accept-encoding", ""):
        return Response(data[1], media_type="application/octet-stream", headers=headers | {"Content-Encoding": "gzip"})
    return Response(data[0], media_type="application/octet-stream", headers=headers)
