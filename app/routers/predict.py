"""POST /predict: images in, classes and probabilities out, at the requested point of the trade-off."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.batching import QueueFull, ShuttingDown
from app.images import ImageError, open_upload
from app.registry import AutoError, Variant
from app.schemas import ErrorResponse, PredictResponse
from app.service import Service, get_ready_service
from core.model import TTA_LEVELS

router = APIRouter(tags=["predict"])

UPLOAD_FIELDS = ("files", "file")
INLINE_DECODE_PIXELS = 64 * 64 * 64  # e.g. 64 CIFAR-sized images
_ERRORS = {
    413: {"model": ErrorResponse, "description": "body, image count or image pixels over the limit"},
    415: {"model": ErrorResponse, "description": "unsupported content type, or a file no image decoder reads"},
    422: {"model": ErrorResponse, "description": "bad query (keep, top_k, max_drop, tta), empty file or image "
                                                 "without pixels"},
    503: {"model": ErrorResponse, "description": "not ready, or the queue is full (see Retry-After)"},
}
_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "multipart/form-data with one or more images in `files` (`file` is accepted too), "
                       "or one raw image body with an image/* content type",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
                "files": {"type": "array", "minItems": 1,  # maxItems: MAX_IMAGES, set by app.main
                          "items": {"type": "string", "format": "binary", "minLength": 1}}}}},
            "image/*": {"schema": {"type": "string", "format": "binary", "minLength": 1}},
        },
    }
}


@dataclass
class Selection:
    """The variant that answers at which TTA level, and for keep=auto with max_latency_ms whether its
    estimate fits."""

    variant: Variant
    tta: int
    estimated_ms: float | None = None
    latency_budget_met: bool | None = None


def resolve_variant(service: Service, keep: str | None, max_drop: float | None,
                    granularity: str = "weight", max_latency_ms: float | None = None,
                    images: int = 1, tta: int | None = None) -> Selection:
    """keep = a shipped keep ratio (granularity breaks the tie when both families have it, and is
    otherwise only a preference: the keep names the variant), "auto", or None (DEFAULT_KEEP, else the
    densest variant of the granularity). max_drop / max_latency_ms only matter with keep=auto, which
    chooses the TTA level too unless the request fixed it (``tta``)."""
    registry = service.registry
    if keep is not None and not keep.strip():
        raise HTTPException(422, detail="keep is empty: give a keep ratio (see GET /variants) or 'auto', or omit it")
    if keep is None:
        default = service.settings.default_keep
        variant = registry.by_keep(default if default is not None else 1.0, granularity)
        if variant is None:  # e.g. granularity=channel has no keep 1.0: its densest variant
            variant = next((v for v in registry.variants if v.granularity == granularity), None)
        if variant is None:
            raise HTTPException(422, detail=f"no {granularity}-granularity variants are loaded")
        return Selection(variant, registry.level(tta))
    if is_auto(keep):
        if max_drop is None and max_latency_ms is None:
            max_drop = service.settings.auto_max_drop
        queued = service.queued_images()
        try:
            choice = registry.auto(max_drop, max_latency_ms, images=images, queued_images=queued,
                                   max_batch=service.settings.max_batch, levels=None if tta is None else (tta,))
        except AutoError as exc:
            raise HTTPException(422, detail=str(exc)) from None
        if max_latency_ms is None:
            return Selection(choice.variant, choice.tta)
        estimate = registry.latency_estimate_ms(choice.variant, images, queued, service.settings.max_batch,
                                                choice.tta)
        return Selection(choice.variant, choice.tta, estimate, None if estimate is None else estimate <= max_latency_ms)
    try:
        value = float(keep)
    except ValueError:
        raise HTTPException(422, detail=f"keep must be a number in (0, 1] or 'auto', got {keep!r}") from None
    available = ", ".join(sorted({f"{v.keep:g}" for v in registry.variants}, key=float, reverse=True))
    if not math.isfinite(value) or not 0 < value <= 1:
        raise HTTPException(422, detail=f"keep must be in (0, 1], got {keep!r}; available: {available}")
    variant = registry.by_keep(value, granularity) or next(
        (v for v in registry.variants if math.isclose(v.keep, value, abs_tol=1e-9)), None)
    if variant is None:
        raise HTTPException(422, detail=f"no variant with keep={value:g}; available keeps: {available}")
    return Selection(variant, registry.level(tta))


def is_auto(keep: str | None) -> bool:
    return keep is not None and keep.strip().lower() == "auto"


def admit(service: Service, variant: Variant, images: int, tta: int | None = None) -> None:
    """Refuse a request the queue cannot take, before its images are read or decoded."""
    try:
        service.batcher(variant, tta).admit(images)
    except QueueFull as exc:
        raise HTTPException(503, detail=f"server busy: {exc}; retry shortly", headers={"Retry-After": "1"}) from exc
    except ShuttingDown as exc:
        raise HTTPException(503, detail=f"{exc}; retry on another replica", headers={"Retry-After": "1"}) from exc


async def read_uploads(request: Request, service: Service) -> list[tuple[str, bytes]]:
    """(name, bytes) of every uploaded image, with the count limit enforced while parsing."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    max_images = service.settings.max_images
    if media_type == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images, max_fields=max_images + 16)
        except StarletteHTTPException as exc:
            if exc.status_code == 413:  # our body limit, raised while the form streamed in
                raise
            if "Too many files" in str(exc.detail):
                raise HTTPException(413, detail=f"more than MAX_IMAGES={max_images} files in one request") from exc
            raise HTTPException(422, detail=f"malformed multipart body: {exc.detail}") from exc
        uploads: list[tuple[str, bytes]] = []
        try:
            for field in UPLOAD_FIELDS:
                for index, item in enumerate(form.getlist(field)):
                    if not isinstance(item, UploadFile):
                        raise HTTPException(422, detail=f"field {field!r} #{index} must be a file upload, not text")
                    uploads.append((item.filename or f"{field}[{index}]", await item.read()))
        finally:
            await form.close()
        if not uploads:
            raise HTTPException(422, detail="no image uploaded: send files in the multipart field 'files' (or 'file')")
        return uploads
    if media_type.startswith("image/"):
        body = await request.body()
        return [("body", body)]
    raise HTTPException(415, detail=f"unsupported content type {content_type or '(none)'!r}: "
                                    "use multipart/form-data with field 'files', or a raw image/* body")


@router.post("/predict", response_model=PredictResponse, response_model_by_alias=True, responses=_ERRORS,
             openapi_extra=_BODY_DOC, summary="Classify images with the chosen variant")
async def predict(
    request: Request,
    keep: str | None = Query(None, description="keep ratio of a shipped variant (e.g. 0.3), or 'auto'",
                             max_length=32),
    max_drop: float | None = Query(None, ge=0, le=100, allow_inf_nan=False,
                                   description="with keep=auto: accuracy points you accept to lose"),
    max_latency_ms: float | None = Query(
        None, gt=0, le=600_000, allow_inf_nan=False,
        description="with keep=auto: the most accurate variant whose measured p95 latency, at the current queue "
                    "depth, fits this many milliseconds (none fits: the fastest answers, latency_budget_met=false)"),
    granularity: Literal["weight", "channel"] = Query(
        "weight", description="weight: unstructured top-K weights; channel: whole channels removed (narrower "
                              "dense layers). Chooses between the two variants when both have the keep, and "
                              "the family when keep is omitted; keep=auto searches both"),
    top_k: int = Query(3, ge=1, le=1000, description="how many classes with probabilities to return"),
    tta: int | None = Query(
        None, ge=min(TTA_LEVELS), le=max(TTA_LEVELS),
        description="test-time augmentation views: 0 = the image alone (1 forward pass), 1 = + its mirror (2), "
                    "2 = + two mirrored 1-pixel translations (6). Omitted: the level the service serves (GET "
                    "/variants: tta), or with keep=auto the level it chooses (given, auto chooses at that level). "
                    "Each variant's accuracy and latency at every level: GET /variants, tta_levels"),
    service: Service = Depends(get_ready_service),
) -> dict:
    began = time.perf_counter()
    variant_label, status, count = "none", 500, 0
    try:
        if not is_auto(keep):
            selection = resolve_variant(service, keep, max_drop, granularity, max_latency_ms, tta=tta)
            variant = selection.variant
            variant_label = variant.name
            admit(service, variant, 1, tta)  # a full queue refuses before the body is read
        uploads = await read_uploads(request, service)
        count = len(uploads)
        if count > service.settings.max_images:
            raise HTTPException(413, detail=f"{count} images; the limit is MAX_IMAGES={service.settings.max_images}")
        if is_auto(keep):  # the choice may depend on how many images this request brings
            selection = resolve_variant(service, keep, max_drop, granularity, max_latency_ms, images=count, tta=tta)
            variant = selection.variant
            variant_label = variant.name
        admit(service, variant, count, selection.tta)  # and before any image is decoded
        pixels = await decode_images(service, uploads)
        started = time.perf_counter()
        probs = await infer(service, variant, pixels, selection.tta)
        inference_ms = (time.perf_counter() - started) * 1e3
        response = _response(service, variant, uploads, probs, top_k, inference_ms, selection.tta)
        if max_latency_ms is not None and is_auto(keep):
            response["latency_budget_met"] = selection.latency_budget_met
            response["estimated_ms"] = selection.estimated_ms
        status = 200
        return response
    except HTTPException as exc:
        status = exc.status_code
        raise
    finally:
        service.metrics.observe_request(variant_label, status, time.perf_counter() - began, count)


async def decode_images(service: Service, uploads: list[tuple[str, bytes]]) -> torch.Tensor:
    """Encoded images → uint8 [N, 3, 32, 32], with every limit checked from the headers first.
    HTTPException (413/415/422) naming the file on any bad upload."""
    try:
        # Headers are read and checked here (limits before any decoding). Thumbnails decode in
        # microseconds, less than a thread hop costs; larger images decode off the event loop.
        opened = [open_upload(data, name, service.settings.max_pixels) for name, data in uploads]
        pixels = sum(upload.pixels for upload in opened)

        def decode_all() -> list:
            return [upload.decode() for upload in opened]

        tensors = decode_all() if pixels <= INLINE_DECODE_PIXELS else await run_in_threadpool(decode_all)
    except ImageError as exc:
        raise HTTPException(exc.status, detail=exc.message) from exc
    return torch.stack(tensors)


async def infer(service: Service, variant: Variant, pixels: torch.Tensor, tta: int | None = None) -> torch.Tensor:
    """uint8 [N, 3, 32, 32] → probabilities [N, C] through the variant's micro-batcher at TTA level ``tta``
    (None: the served one); 503 when busy."""
    try:
        return await service.predict(variant, pixels, tta)
    except QueueFull as exc:
        raise HTTPException(503, detail=f"server busy: {exc}; retry shortly", headers={"Retry-After": "1"}) from exc
    except ShuttingDown as exc:
        raise HTTPException(503, detail=f"{exc}; retry on another replica", headers={"Retry-After": "1"}) from exc


def _response(service: Service, variant: Variant, uploads: list[tuple[str, bytes]], probs, top_k: int,
              inference_ms: float, tta: int) -> dict:
    classes = service.registry.classes
    k = min(top_k, len(classes))
    values, indices = probs.topk(k, dim=1)
    predictions = []
    for (name, _), row_values, row_indices in zip(uploads, values.tolist(), indices.tolist()):
        top = [{"class": classes[i], "index": i, "probability": p} for p, i in zip(row_values, row_indices)]
        predictions.append({"file": name, "class": top[0]["class"], "index": top[0]["index"],
                            "probability": top[0]["probability"], "top_k": top})
    return {"variant": {"name": variant.name, "keep": variant.keep, "sparsity": variant.sparsity,
                        "granularity": variant.granularity},
            "tta": tta, "predictions": predictions, "inference_ms": inference_ms}
