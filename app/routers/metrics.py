"""Prometheus text format, and a JSON view with live per-variant latency."""

from __future__ import annotations

import os
from typing import Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.service import Service, get_service

router = APIRouter(tags=["metrics"])


def _json_view(service: Service) -> dict:
    registry = service.registry
    return {
        "ready": registry.ready,
        "worker_pid": os.getpid(),  # live latency and queues are this worker's (Prometheus text sums workers)
        "variants": [
            {"name": v.name, "keep": v.keep, "granularity": v.granularity, "test_acc_mean": v.test_acc_mean,
             "drop": v.drop, "params": v.params, "checkpoint_bytes": v.bytes,
             "startup_latency": {f"batch_{b}": s for b, s in sorted(v.latency.items())},
             "live_latency": service.metrics.live_latency(v.name),
             "queued_images": service.queued_images(v.name)}
            for v in registry.variants
        ],
    }


@router.get("/metrics", summary="Prometheus metrics (format=json for a JSON view)",
            responses={200: {"content": {"text/plain": {}, "application/json": {}}}})
async def metrics(format: Literal["prometheus", "json"] = Query("prometheus"),
                  service: Service = Depends(get_service)) -> Response:
    if format == "json":
        return JSONResponse(_json_view(service))
    return Response(generate_latest(service.metrics.exposition_registry()), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics.json", summary="JSON view of the metrics")
async def metrics_json(service: Service = Depends(get_service)) -> dict:
    return _json_view(service)
