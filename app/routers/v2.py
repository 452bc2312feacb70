"""The Open Inference Protocol (KServe V2 / Triton HTTP), beside the service's own REST shape.

Spec: kserve/open-inference-protocol `specification/protocol/inference_rest.md`, with Triton's binary
tensor extension (`extension_binary_data.md`: a JSON header of `Inference-Header-Content-Length` bytes
followed by raw tensors) and classification extension (`class_count` → "score:index:label" strings).

Every variant is a model, named as in /variants, version "1". The model `auto` lets the server choose
from request parameters: `keep` (+ `granularity`) names a variant, or `max_drop` / `max_latency_ms` as
for /predict (which choose the TTA level too). Any model takes the parameter `tta` (0, 1 or 2: test-time
augmentation views, as /predict's query; default the served level). Inputs (send one of them):
  IMAGE        UINT8 [N, 32, 32, 3]  RGB pixels at the model's size (the client resizes)
  IMAGE_BYTES  BYTES [N]             encoded image files, decoded with /predict's limits
Output `probabilities` FP32 [N, classes]. Requests go through the same micro-batchers and metrics as
/predict; errors are 4xx (or 503) with {"error": "..."}.
"""

from __future__ import annotations

import json
import math
import struct
import time

import numpy as np
import torch
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from app.registry import Variant
from app.routers.predict import admit, decode_images, infer, resolve_variant
from app.service import Service, get_service
from core.model import TTA_LEVELS
from core.preprocess import IMAGE_SIZE

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])
health_router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])
VERSION = "1"
AUTO = "auto"
HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data", "classification"]


class V2Error(HTTPException):
    """An error the protocol's way: {"error": message}."""


class V2ErrorBody(BaseModel):
    error: str = Field(description="what is wrong")


def _errors(*statuses: int) -> dict:
    text = {400: "malformed request, inputs or parameters", 404: "unknown model or version",
            413: "too many images or too large a body", 415: "an IMAGE_BYTES element is not an image",
            422: "an unusable image", 503: "not ready, or busy (see Retry-After)"}
    return {status: {"model": V2ErrorBody, "description": text[status]} for status in statuses}


INFER_BODY = {"requestBody": {"required": True, "description": (
    "an inference request (JSON), or with the binary tensor extension that JSON followed by raw tensor "
    "bytes, its length in the Inference-Header-Content-Length header"), "content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": {"type": "object"}},
        "outputs": {"type": "array", "items": {"type": "object"}}}, "required": ["inputs"]}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def _fail(status: int, message: str) -> V2Error:
    return V2Error(status, detail=message, headers={"Retry-After": "1"} if status == 503 else None)


def _ready_service(request: Request) -> Service:
    service = get_service(request)
    if not service.registry.ready:
        raise _fail(503, f"not ready: {service.registry.error or 'models are still loading'}")
    return service


def _model(service: Service, name: str, version: str | None) -> Variant | None:
    """The variant named ``name`` (None for `auto`); 404 for an unknown model or version."""
    if version is not None and version != VERSION:
        raise _fail(404, f"model {name!r} has no version {version!r}; its only version is {VERSION!r}")
    if name == AUTO:
        return None
    for variant in service.registry.variants:
        if variant.name == name:
            return variant
    names = ", ".join(v.name for v in service.registry.variants)
    raise _fail(404, f"unknown model {name!r}; models: {AUTO}, {names}")


# -- health and metadata ---------------------------------------------------------------------------
@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict:
    return {"name": "gated-prune", "version": request.app.version, "extensions": EXTENSIONS}


@health_router.get("/health/live", summary="Server live")
async def live() -> dict:
    return {"live": True}


@health_router.get("/health/ready", summary="Server ready", responses={503: {"description": "not ready"}})
async def ready(service: Service = Depends(get_service)) -> JSONResponse:
    ready_now = service.registry.ready
    return JSONResponse({"ready": ready_now}, status_code=200 if ready_now else 503)


def _metadata(service: Service, name: str, variant: Variant | None) -> dict:
    classes = len(service.registry.classes)
    parameters = {"precision": service.registry.precision, "tta": service.registry.tta}
    if variant is not None:
        parameters |= {"keep": variant.keep, "granularity": variant.granularity, "test_acc_mean": variant.test_acc_mean,
                       "drop": variant.drop}
    else:
        parameters |= {"chooses_from": [v.name for v in service.registry.variants],
                       "request_parameters": ["keep", "granularity", "max_drop", "max_latency_ms", "tta"]}
    return {"name": name, "versions": [VERSION], "platform": "pytorch_compact",
            "inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [-1, IMAGE_SIZE, IMAGE_SIZE, 3]},
                       {"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]}],
            "parameters": parameters}


@router.get("/models/{model}", summary="Model metadata", responses=_errors(404, 503))
async def model_metadata(model: str, service: Service = Depends(_ready_service)) -> dict:
    return _metadata(service, model, _model(service, model, None))


@router.get("/models/{model}/versions/{version}", summary="Model metadata (version)", responses=_errors(404, 503))
async def model_version_metadata(model: str, version: str, service: Service = Depends(_ready_service)) -> dict:
    return _metadata(service, model, _model(service, model, version))


@router.get("/models/{model}/ready", summary="Model ready", responses=_errors(404, 503))
async def model_ready(model: str, service: Service = Depends(get_service)) -> JSONResponse:
    return _model_ready(service, model, None)


@router.get("/models/{model}/versions/{version}/ready", summary="Model ready (version)", responses=_errors(404, 503))
async def model_version_ready(model: str, version: str, service: Service = Depends(get_service)) -> JSONResponse:
    return _model_ready(service, model, version)


def _model_ready(service: Service, model: str, version: str | None) -> JSONResponse:
    if not service.registry.ready:
        return JSONResponse({"name": model, "ready": False}, status_code=503)
    _model(service, model, version)
    return JSONResponse({"name": model, "ready": True})


# -- inference -------------------------------------------------------------------------------------
def _split_body(request: Request, body: bytes) -> tuple[dict, memoryview]:
    """(the JSON header, the binary tensor data after it) per the binary tensor extension."""
    declared = request.headers.get(HEADER_LENGTH)
    try:
        length = len(body) if declared is None else int(declared)
    except ValueError:
        raise _fail(400, f"{HEADER_LENGTH} is not a number: {declared!r}") from None
    if not 0 <= length <= len(body):
        raise _fail(400, f"{HEADER_LENGTH}={length} but the body has {len(body)} bytes")
    try:
        header = json.loads(bytes(body[:length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(400, f"the inference request header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(400, "the inference request must be a JSON object")
    return header, memoryview(body)[length:]


def _bytes_elements(raw: memoryview, name: str) -> list[bytes]:
    """BYTES tensor in binary form: each element a 4-byte little-endian length, then its bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise _fail(400, f"input {name!r}: truncated BYTES element length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise _fail(400, f"input {name!r}: BYTES element of {size} bytes runs past the data")
        items.append(bytes(raw[offset:offset + size]))
        offset += size
    return items


def _take_inputs(header: dict, binary: memoryview) -> dict[str, tuple[dict, memoryview | None]]:
    """Input name → (its JSON description, its binary data if sent that way)."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _fail(400, "the request names no inputs; send IMAGE (UINT8 [N,32,32,3]) or IMAGE_BYTES (BYTES [N])")
    taken, offset = {}, 0
    for item in inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _fail(400, "every input needs a name, a datatype, a shape and data")
        size = (item.get("parameters") or {}).get("binary_data_size")
        data = None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise _fail(400, f"input {item['name']!r}: binary_data_size={size!r} does not fit the "
                                 f"{len(binary) - offset} bytes of binary data left")
            data, offset = binary[offset:offset + size], offset + size
        taken[item["name"]] = (item, data)
    if offset != len(binary):
        raise _fail(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    unknown = set(taken) - {"IMAGE", "IMAGE_BYTES"}
    if unknown:
        raise _fail(400, f"unknown input {sorted(unknown)}; inputs are IMAGE (UINT8) and IMAGE_BYTES (BYTES)")
    if len(taken) != 1:
        raise _fail(400, "send exactly one of IMAGE and IMAGE_BYTES")
    return taken


def _shape(item: dict) -> list[int]:
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _fail(400, f"input {item['name']!r}: shape must be a list of non-negative integers, got {shape!r}")
    return shape


async def _pixels(service: Service, name: str, item: dict, data: memoryview | None) -> torch.Tensor:
    """The request's images as uint8 [N, 3, 32, 32]."""
    shape, datatype, limit = _shape(item), item.get("datatype"), service.settings.max_images
    if name == "IMAGE":
        if datatype != "UINT8":
            raise _fail(400, f"input IMAGE must be UINT8, got {datatype!r}")
        if len(shape) != 4 or shape[1:] != [IMAGE_SIZE, IMAGE_SIZE, 3]:
            raise _fail(400, f"input IMAGE must have shape [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3] (RGB at the model's "
                             f"size; resize on the client, or send IMAGE_BYTES), got {shape}")
        count = shape[0]
        if not 1 <= count <= limit:
            raise _fail(413 if count > limit else 400, f"{count} images; between 1 and MAX_IMAGES={limit}")
        expected = math.prod(shape)
        if data is not None:
            if len(data) != expected:
                raise _fail(400, f"input IMAGE: {len(data)} bytes of binary data for shape {shape} ({expected})")
            array = np.frombuffer(data, dtype=np.uint8)
        else:
            try:
                array = np.asarray(item.get("data"), dtype=np.int64).reshape(-1)
            except (TypeError, ValueError):
                raise _fail(400, "input IMAGE: data must be integers 0..255") from None
            if array.size != expected:
                raise _fail(400, f"input IMAGE: {array.size} values for shape {shape} ({expected})")
            if array.size and (array.min() < 0 or array.max() > 255):
                raise _fail(400, "input IMAGE: UINT8 values must be in 0..255")
            array = array.astype(np.uint8)
        # NHWC → NCHW in numpy: a torch copy this size would start an OpenMP team on the event loop
        # (app/batching.py MicroBatcher._execute says why that slows every forward pass)
        return torch.from_numpy(array.reshape(shape).transpose(0, 3, 1, 2).copy())  # C-order copy
    if datatype != "BYTES":
        raise _fail(400, f"input IMAGE_BYTES must be BYTES, got {datatype!r}")
    if len(shape) != 1:
        raise _fail(400, f"input IMAGE_BYTES must have shape [N], got {shape}")
    if data is None:
        raise _fail(400, "input IMAGE_BYTES: send encoded images as binary data (the binary tensor extension; "
                         "tritonclient does by default), JSON strings cannot carry them")
    files = _bytes_elements(data, name)
    if len(files) != shape[0]:
        raise _fail(400, f"input IMAGE_BYTES: shape says {shape[0]} elements, the data holds {len(files)}")
    if not 1 <= len(files) <= limit:
        raise _fail(413 if len(files) > limit else 400, f"{len(files)} images; between 1 and MAX_IMAGES={limit}")
    try:
        return await decode_images(service, [(f"IMAGE_BYTES[{i}]", f) for i, f in enumerate(files)])
    except HTTPException as exc:
        raise _fail(exc.status_code, str(exc.detail)) from None


def _choose(service: Service, variant: Variant | None, parameters: dict, images: int,
            tta: int | None) -> tuple[Variant, int]:
    """The variant and TTA level that answer: the named model at the requested (or served) level, or for
    the model `auto` what the parameters choose (auto chooses the level too unless tta is given)."""
    if variant is not None:
        return variant, service.registry.level(tta)
    keep = parameters.get("keep", AUTO if {"max_drop", "max_latency_ms"} & set(parameters) else None)
    keep = None if keep is None else str(keep)

    def number(key: str) -> float | None:
        value = parameters.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise _fail(400, f"parameter {key} must be a non-negative number, got {value!r}")
        return float(value)

    granularity = parameters.get("granularity", "weight")
    if granularity not in ("weight", "channel"):
        raise _fail(400, f"parameter granularity must be 'weight' or 'channel', got {granularity!r}")
    try:
        selection = resolve_variant(service, keep, number("max_drop"), granularity, number("max_latency_ms"),
                                    images=images, tta=tta)
        return selection.variant, selection.tta
    except HTTPException as exc:
        raise _fail(400 if exc.status_code == 422 else exc.status_code, str(exc.detail)) from None


def _tta(parameters: dict) -> int | None:
    """The request's test-time augmentation level (parameter tta), if it asked for one."""
    level = parameters.get("tta")
    if level is None:
        return None
    if isinstance(level, bool) or level not in TTA_LEVELS:
        raise _fail(400, f"parameter tta must be one of {', '.join(map(str, TTA_LEVELS))}, got {level!r}")
    return int(level)


def _outputs(header: dict, classes: int) -> list[dict]:
    """The requested outputs, each {name, binary, class_count}; all (probabilities) when none is named."""
    binary_default = bool((header.get("parameters") or {}).get("binary_data_output", False))
    requested = header.get("outputs")
    if requested is None:
        return [{"name": "probabilities", "binary": binary_default, "class_count": 0}]
    if not isinstance(requested, list):
        raise _fail(400, "outputs must be a list")
    result = []
    for item in requested:
        if not isinstance(item, dict) or item.get("name") != "probabilities":
            name = item.get("name") if isinstance(item, dict) else item
            raise _fail(400, f"unknown output {name!r}; the output is 'probabilities'")
        parameters = item.get("parameters") or {}
        count = parameters.get("classification", 0)
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= classes:
            raise _fail(400, f"classification must be an integer in 0..{classes}, got {count!r}")
        result.append({"name": "probabilities", "binary": bool(parameters.get("binary_data", binary_default)),
                       "class_count": count})
    return result


def _encode(probs: torch.Tensor, output: dict, labels: list[str]) -> tuple[dict, bytes | None]:
    """One output tensor: its JSON description and, if binary was asked for, its bytes."""
    if output["class_count"]:
        values, indices = probs.topk(output["class_count"], dim=1)
        strings = [[f"{v:f}:{i}:{labels[i]}" for v, i in zip(row_v, row_i)]
                   for row_v, row_i in zip(values.tolist(), indices.tolist())]
        description = {"name": output["name"], "datatype": "BYTES", "shape": list(values.shape)}
        if output["binary"]:
            raw = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for row in strings for s in row)
            return description | {"parameters": {"binary_data_size": len(raw)}}, raw
        return description | {"data": [s for row in strings for s in row]}, None
    description = {"name": output["name"], "datatype": "FP32", "shape": list(probs.shape)}
    if output["binary"]:
        raw = probs.contiguous().numpy().astype("<f4").tobytes()
        return description | {"parameters": {"binary_data_size": len(raw)}}, raw
    return description | {"data": probs.reshape(-1).tolist()}, None


INFER_ERRORS = _errors(400, 404, 413, 415, 422, 503)


@router.post("/models/{model}/infer", summary="Inference (JSON, or JSON + binary tensors)", responses=INFER_ERRORS,
             openapi_extra=INFER_BODY)
async def model_infer(model: str, request: Request, service: Service = Depends(_ready_service)) -> Response:
    return await _infer(model, None, request, service)


@router.post("/models/{model}/versions/{version}/infer", summary="Inference (version)", responses=INFER_ERRORS,
             openapi_extra=INFER_BODY)
async def model_version_infer(model: str, version: str, request: Request,
                              service: Service = Depends(_ready_service)) -> Response:
    return await _infer(model, version, request, service)


async def _infer(model: str, version: str | None, request: Request, service: Service) -> Response:
    began = time.perf_counter()
    label, status, count = "none", 500, 0  # the label is a variant name only: never a client's string
    try:
        fixed = _model(service, model, version)
        if fixed is not None:
            label = fixed.name
            admit(service, fixed, 1)  # a full queue refuses before the body is read
        header, binary = _split_body(request, await request.body())
        parameters = header.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise _fail(400, "parameters must be an object")
        ((name, (item, data)),) = _take_inputs(header, binary).items()
        outputs = _outputs(header, len(service.registry.classes))
        shape = _shape(item)
        count = shape[0] if shape else 0
        variant, tta = _choose(service, fixed, parameters, max(1, count), _tta(parameters))
        label = variant.name
        admit(service, variant, max(1, count), tta)  # before any image is decoded
        pixels = await _pixels(service, name, item, data)
        count = len(pixels)
        probs = await infer(service, variant, pixels, tta)
        encoded = [_encode(probs, output, service.registry.classes) for output in outputs]
        body = {"model_name": model, "model_version": VERSION, "outputs": [d for d, _ in encoded],
                "parameters": {"variant": variant.name, "keep": variant.keep, "granularity": variant.granularity,
                               "tta": tta}}
        if "id" in header:
            body["id"] = header["id"]
        status = 200
        raw = [r for _, r in encoded if r is not None]
        if not raw:
            return JSONResponse(body)
        head = json.dumps(body).encode()
        return Response(head + b"".join(raw), media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(head))})
    except V2Error as exc:
        status = exc.status_code
        raise
    except HTTPException as exc:  # from the shared helpers: the same error, the protocol's shape
        status = exc.status_code
        raise _fail(exc.status_code, str(exc.detail)) from None
    finally:
        service.metrics.observe_request(label, status, time.perf_counter() - began, count)
