"""FastAPI application: `create_app(settings)` wires routers, limits and error handling."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.routers import health, metrics, predict, v2, variants
from app.security import require_api_key, warn_if_open
from app.service import Service
from app.settings import Settings, get_settings

log = logging.getLogger("app")


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=f"request body is larger than MAX_BODY_BYTES={limit:,} bytes")


class BodyLimitMiddleware:
    """Refuses bodies over ``limit`` bytes without reading them into memory: by Content-Length when
    the client sends one, and by counting streamed chunks when it does not (chunked uploads)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                response = JSONResponse({"detail": "Content-Length header is not a number"}, status_code=400)
                await response(scope, receive, send)
                return
            if too_big:
                exc = BodyTooLarge(self.limit)
                key = "error" if scope.get("path", "").startswith("/v2") else "detail"  # each protocol's shape
                await JSONResponse({key: exc.detail}, status_code=413)(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


class RequestTimeoutMiddleware:
    """A request not answered within ``seconds`` (a slow upload, a long queue) gets 504 with a JSON
    detail; its images, if already queued, are still computed and dropped (never half a batch)."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, tracking_send), self.seconds)
        except TimeoutError:
            if started:  # too late for a status: the connection is closed mid-response
                raise
            detail = f"request not answered within REQUEST_TIMEOUT_S={self.seconds:g} s"
            await JSONResponse({"detail": detail}, status_code=504)(scope, receive, send)


DOCS_ASSETS = "/static/docs"


def add_offline_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc from the fastapi-offline package's bundled assets, not a CDN."""
    import fastapi_offline
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    assets = Path(fastapi_offline.__file__).parent / "static"
    # ReDoc's bundle fetches its vendor's logo from a CDN, unconditionally: serve it with that one URL
    # pointed at nothing (the image then hides itself), so the page asks no other host for anything.
    redoc_js = (assets / "redoc.standalone.js").read_text().replace("https://cdn.redoc.ly/redoc/logo-mini.svg", "")

    @app.get(f"{DOCS_ASSETS}/redoc.standalone.js", include_in_schema=False)
    async def redoc_bundle() -> Response:
        return Response(redoc_js, media_type="application/javascript")

    app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - docs",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)


PAGE = Path(__file__).parent / "static"


def add_page(app: FastAPI) -> None:
    """GET / : a small page for people (plain HTML/JS/CSS in app/static, no build step, nothing
    loaded from another host) that calls the same API as every other client."""
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    app.mount("/static/app", StaticFiles(directory=PAGE), name="page-assets")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE / "index.html", media_type="text/html")


def describe_loaded_variants(app: FastAPI, settings: Settings) -> None:
    """The OpenAPI schema lists what this server actually accepts: /predict's `keep` as an enum of the
    loaded keeps (both granularities) and `auto`, at most MAX_IMAGES files, non-empty bodies. The keeps
    are known once the models are loaded, so the schema is cached only from then on."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        operation = schema["paths"]["/predict"]["post"]
        files = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["files"]
        files["maxItems"] = settings.max_images
        service = getattr(app.state, "service", None)
        if service is None or not service.registry.ready:
            return schema  # not cached: asked again once the keeps are known
        registry = service.registry
        keeps = sorted({f"{v.keep:g}" for v in registry.variants}, key=float, reverse=True)
        by_granularity = {g: ", ".join(f"{k:g}" for k in registry.keeps(g)) for g in ("weight", "channel")}
        for parameter in operation["parameters"]:
            if parameter["name"] == "keep":
                parameter["schema"] = {"type": "string", "enum": [*keeps, "auto"]}
                parameter["description"] = (f"a loaded keep ratio — weight: {by_granularity['weight']}; channel: "
                                            f"{by_granularity['channel']} — or 'auto'")
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        service = Service(settings)
        app.state.service = service
        warn_if_open(settings.host, settings.api_keys)
        await service.start()
        try:
            yield
        finally:
            await service.stop()  # queued requests finish before the process exits

    app = FastAPI(
        title="Gated-pruning CIFAR-10 classifier",
        version="0.1.0",
        description="Pick your point on the accuracy / speed trade-off per request: `POST /predict?keep=0.3`.",
        lifespan=lifespan,
        docs_url=None,  # served below from assets shipped in a pip package: no CDN, works offline
        redoc_url=None,
    )
    add_offline_docs(app)
    add_page(app)
    describe_loaded_variants(app, settings)
    app.state.settings = settings
    keyed = [Depends(require_api_key)]  # a no-op unless API_KEYS is set
    app.include_router(health.router)  # always open: orchestrators probe without credentials
    app.include_router(predict.router, dependencies=keyed)
    app.include_router(variants.router, dependencies=keyed)
    app.include_router(metrics.router, dependencies=keyed)
    app.include_router(v2.health_router)  # /v2/health/*: open, like /health and /ready
    app.include_router(v2.router, dependencies=keyed)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(RequestTimeoutMiddleware, seconds=settings.request_timeout_s)

    @app.exception_handler(v2.V2Error)
    async def v2_error(_: Request, exc: v2.V2Error) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Same shape as FastAPI's default, minus the echoed input (it may be large or binary).
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Never echo a stack trace to a client; log it for the operator.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; the server logged the details"}, status_code=500)

    return app
