"""The HTTP routes (FastAPI): thin shells over :class:`~.service.Service`.

| route | what |
|---|---|
| ``GET /`` | the web page (static HTML + JS, no build step, nothing from a CDN) |
| ``POST /v1/images/generations`` | OpenAI-shaped generation plus idcraft's fields (no reference: text-only) |
| ``POST /v1/images/edits`` | OpenAI's multipart ``image`` + ``prompt``: the images are the references |
| ``POST /v1/jobs`` | the same body, run as a job: 202 at once, then ``GET /v1/jobs/{id}`` |
| ``GET /v1/jobs/{id}`` / ``DELETE`` | a job's state, step and result / cancel it |
| ``GET /v1/jobs/{id}/events`` | the job's progress as server-sent events |
| ``POST /v1/references`` | upload a reference once (JSON base64 or multipart ``file``) -> its id |
| ``GET /v1/models`` | served methods, their defaults and sizes (the world: its vocabulary) |
| ``GET /v1/models/{id}`` | one of them (OpenAI's model object plus idcraft's details) |
| ``GET /v1/examples`` | reference images and prompts to try (the world's held-out characters) |
| ``GET /favicon.ico`` | the page's icon (SVG) |
| ``GET /healthz`` | liveness and queue state |
| ``GET /readyz`` | readiness: models loaded and the store reachable (503 otherwise) |
| ``GET /metrics`` | Prometheus text |

With a token configured (the environment variable named by ``server.auth_token_env``), ``/v1/*`` and
``/metrics`` need ``Authorization: Bearer <token>``, checked from the headers before any body is read
(:class:`~.middleware.RequireToken`); the page, ``/healthz`` and ``/readyz`` stay open. A synchronous
generation whose client disconnects is cancelled (it stops at its next denoising step and frees its
device slot).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..cancel import CancelToken
from ..errors import IdcraftError
from .catalog import Catalog, build_catalog
from .config import ServeConfig
from .edits import edit_request
from .errors import ApiError, bad_request, error_response, unauthorized
from .middleware import BodyLimit, Guard, RequireToken, token_matches
from .schemas import ImageRequest, ReferenceUpload
from .service import Service

log = logging.getLogger("idcraft.serve")

STATIC = resources.files("idcraft.serve") / "static"
T = TypeVar("T")


def create_app(config: ServeConfig | None = None, catalog: Catalog | None = None) -> FastAPI:
    """The server's application; ``catalog``: methods already loaded (else loaded from ``config`` now)."""
    config = config or ServeConfig()
    catalog = catalog if catalog is not None else build_catalog(config)
    service = Service(config, catalog)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        log.info("idcraft serve: %s ready", ", ".join(catalog.methods))
        try:
            yield
        finally:
            await service.aclose()

    app = FastAPI(
        title="idcraft",
        summary="Identity-preserving image generation: IP-Adapter, FaceID, InstantID, InstantCharacter.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.service = service
    _errors(app, service)
    _routes(app, service)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.add_middleware(
        BodyLimit,
        max_bytes=config.server.max_body_bytes,
        metrics=service.metrics,
        timeout_s=config.server.body_timeout_s,
    )
    app.add_middleware(RequireToken, token=lambda: service.token, metrics=service.metrics)
    if config.server.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.server.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(Guard, metrics=service.metrics)
    return app


def _errors(app: FastAPI, service: Service) -> None:
    @app.exception_handler(ApiError)
    @app.exception_handler(IdcraftError)
    async def known(request: Request, exc: Exception):
        return error_response(exc, service.metrics, log)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error_response(bad_request(validation_message(exc)), service.metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}."
        elif exc.status_code == 400 and exc.__cause__ is not None:
            message = body_parse_message(exc.__cause__) or message
        return error_response(
            ApiError(exc.status_code, kind, message, dict(exc.headers or {})), service.metrics
        )


def validation_message(exc: RequestValidationError) -> str:
    """One line per problem, naming the field: ``n: Input should be a valid integer``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        if error.get("type") == "extra_forbidden":
            parts.append(f"{where}: unknown field (not read by this API; see GET /docs)")
        elif error.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})")
        else:
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request."


def body_parse_message(cause: BaseException) -> str | None:
    """What was wrong with a JSON body the parser gave up on (FastAPI says only "error parsing")."""
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"the body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at position {cause.start}): "
            "send the JSON as UTF-8 text."
        )
    if isinstance(cause, RecursionError):
        return "the body's JSON is nested too deeply to read: requests are flat objects (see GET /docs)."
    return None


def _routes(app: FastAPI, service: Service) -> None:
    def authorized(request: Request) -> None:
        """Also checked by :class:`RequireToken` before the body; kept on the routes so a route is never
        open by a mistake in the middleware order."""
        token = service.token
        if token is not None and not token_matches(token, request.headers.get("authorization", "")):
            raise unauthorized()

    guarded = [Depends(authorized)]

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response((STATIC / "favicon.svg").read_bytes(), media_type="image/svg+xml")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        health = service.health()
        return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        import asyncio

        ready = await asyncio.to_thread(service.readiness)  # a store round trip: off the event loop
        return JSONResponse(ready, status_code=200 if ready["status"] == "ready" else 503)

    @app.get("/metrics", dependencies=guarded)
    async def metrics() -> Response:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return service.models()

    @app.get("/v1/models/{model_id}", dependencies=guarded)
    async def model(model_id: str) -> dict:
        return service.model(model_id)

    @app.get("/v1/examples", dependencies=guarded)
    async def examples() -> dict:
        return service.example_list()

    @app.post("/v1/images/generations", dependencies=guarded)
    async def generations(body: ImageRequest, request: Request) -> Response:
        answer = await until_disconnected(request, service.generate(body, cancel=CancelToken()))
        if answer is None:
            return Response(status_code=499)  # read by no one: the client has gone
        return JSONResponse(answer)

    @app.post("/v1/images/edits", dependencies=guarded)
    async def edits(request: Request) -> Response:
        body = await edit_request(request)
        answer = await until_disconnected(request, service.generate(body, cancel=CancelToken()))
        if answer is None:
            return Response(status_code=499)  # read by no one: the client has gone
        return JSONResponse(answer)

    @app.post("/v1/references", dependencies=guarded)
    async def references(request: Request) -> dict:
        return await service.add_reference(await _upload_bytes(request))

    _job_routes(app, service, guarded)


def _job_routes(app: FastAPI, service: Service, guarded: list) -> None:
    """``/v1/jobs``: long work answered at once and followed by id (see :mod:`.jobs`)."""

    @app.post("/v1/jobs", dependencies=guarded, status_code=202)
    async def create_job(body: ImageRequest) -> JSONResponse:
        return JSONResponse(await service.submit_job(body), status_code=202)

    @app.get("/v1/jobs/{job_id}", dependencies=guarded)
    async def get_job(job_id: str) -> dict:
        return service.job(job_id)

    @app.delete("/v1/jobs/{job_id}", dependencies=guarded)
    async def delete_job(job_id: str) -> dict:
        return await service.cancel_job(job_id)

    @app.get("/v1/jobs/{job_id}/events", dependencies=guarded)
    async def job_events(job_id: str) -> StreamingResponse:
        events = service.job_events(job_id)
        first = await anext(events)  # an unknown id is a 404 here, before the stream starts
        return StreamingResponse(
            _chain(first, events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


async def _chain(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Await ``work`` (a coroutine); if the client disconnects first, cancel it -- its generation's token
    is cancelled with it (:meth:`~.scheduler.Scheduler.execute`), so the device slot is freed within a
    step -- and give ``None`` (no one is listening)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    return task.result()


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already: receive waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _upload_bytes(request: Request) -> bytes:
    """The image of ``POST /v1/references``: multipart ``file`` (or ``image``), or JSON ``{"image": b64}``."""
    from pydantic import ValidationError

    from .images import from_base64

    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file") or form.get("image")
        if upload is None or isinstance(upload, str):
            raise bad_request("multipart upload: send the image as a file field named 'file'.")
        return await upload.read()
    try:
        body = ReferenceUpload.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    return from_base64(body.image, "image")
