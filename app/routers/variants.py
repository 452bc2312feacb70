"""The trade-off table and plot."""

from __future__ import annotations

import io

import torch
from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from app.registry import resident_memory_bytes
from app.schemas import ErrorResponse, VariantsResponse
from app.service import Service, get_ready_service
from core.plot import plot_tradeoff

router = APIRouter(tags=["variants"])
NOT_READY = {503: {"model": ErrorResponse, "description": "models not loaded"}}


@router.get("/variants", response_model=VariantsResponse, responses=NOT_READY,
            summary="One row per variant: size, accuracy (from training) and latency (measured here)")
async def variants(service: Service = Depends(get_ready_service)) -> dict:
    registry = service.registry
    basis = registry.speed_basis()
    pareto = {v.name for v in registry.pareto(basis)}
    return {"classes": registry.classes, "precision": registry.precision, "tta": registry.tta,
            "resident_memory_bytes": resident_memory_bytes(),
            "execution": {"status": service.execution, "plan": service.plan_source, "key": service.plan_key,
                          "threads": torch.get_num_threads(), "auto_speed_basis": basis},
            "variants": [{**v.describe(), "pareto": v.name in pareto} for v in registry.variants]}


@router.get("/variants/plot", responses={200: {"content": {"image/png": {}}}, **NOT_READY},
            response_class=Response, summary="Accuracy vs sparsity with every variant's measured latency (PNG)")
async def variants_plot(service: Service = Depends(get_ready_service)) -> Response:
    """Rendered once per set of figures (they change only while plans are applied or measured),
    then served from memory."""
    registry = service.registry
    latency = [{"granularity": v.granularity, "sparsity": v.sparsity, "ms": v.latency[1]["p50_ms"]}
               for v in registry.variants if 1 in v.latency]
    key = repr(latency)
    cached = service.plot_cache
    if cached is None or cached[0] != key:
        table = registry.manifest.get("sweep") or [
            {"criterion": "dense" if v.keep == 1.0 else v.criterion, "finetuned": v.finetuned, "keep": v.keep,
             "sparsity": v.sparsity, "test_acc_mean": v.test_acc_mean, "test_acc_std": v.test_acc_std}
            for v in registry.variants
        ]

        def render() -> bytes:
            buffer = io.BytesIO()
            plot_tradeoff(table, buffer, latency_ms=latency)
            return buffer.getvalue()

        cached = service.plot_cache = (key, await run_in_threadpool(render))
    return Response(cached[1], media_type="image/png", headers={"Cache-Control": "no-cache"})
