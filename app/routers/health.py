"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from app.schemas import HealthResponse, ReadyResponse
from app.service import Service, get_service

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, summary="The process is alive")
async def health() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/ready", response_model=ReadyResponse, summary="Models verified, loaded and warm",
            responses={503: {"model": ReadyResponse, "description": "still loading, or models/ is unusable"}})
async def ready(service: Service = Depends(get_service)) -> JSONResponse:
    registry = service.registry
    body = ReadyResponse(ready=registry.ready, variants=len(registry.variants) if registry.ready else 0,
                         error=registry.error, execution=service.execution)
    return JSONResponse(body.model_dump(), status_code=200 if registry.ready else 503)
