"""ASGI middlewares: the bearer token checked from the headers before any body is read, a body-size and
body-time bound, and the outermost guard that times every request and turns an unexpected exception into
a logged 500 with the API's JSON error shape (never a traceback)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

from .errors import ApiError, error_response, too_large, unauthorized

log = logging.getLogger("idcraft.serve")

#: Endpoint labels of the metrics (anything else is "other", keeping the series few).
ENDPOINTS = (
    "/v1/images/generations",
    "/v1/jobs",
    "/v1/references",
    "/v1/models",
    "/v1/examples",
    "/healthz",
    "/metrics",
    "/",
)


def endpoint_of(path: str) -> str:
    if path in ENDPOINTS:
        return path
    if path.startswith("/static/"):
        return "/static"
    if path.startswith("/v1/jobs/"):
        return "/v1/jobs/{id}"
    return "other"


def needs_token(path: str) -> bool:
    """The API and the metrics; the page, its files, ``/healthz`` and the docs stay open."""
    return path.startswith("/v1/") or path == "/metrics"


def token_matches(token: str, authorization: str) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` as a bearer token (constant time)."""
    scheme, _, value = authorization.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(value.strip().encode(), token.encode())


class RequireToken:
    """With a token configured, a request to the API without it is answered 401 from its headers alone:
    its body is never read (a client without the token cannot make the server buffer or parse
    anything). ``token()`` reads the configured token (``None``: open). CORS preflights pass."""

    def __init__(self, app, token: Callable[[], str | None], metrics=None):
        self.app = app
        self.token = token
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        token = self.token()
        if (
            scope["type"] != "http"
            or token is None
            or scope["method"] == "OPTIONS"
            or not needs_token(scope.get("path", ""))
        ):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if not token_matches(token, given):
            return await error_response(unauthorized(), self.metrics)(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuse a body over ``max_bytes`` with 413: at once from its Content-Length, or once the bytes read
    pass the bound (chunked uploads); a body not in full within ``timeout_s`` seconds of the headers is
    408 (a client that stalls part-way holds no connection for ever); otherwise hand the application
    the body already read."""

    def __init__(self, app, max_bytes: int, metrics=None, timeout_s: float = 30.0):
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, int(declared))
        chunks, total = [], 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                exc = ApiError(
                    408,
                    "timeout",
                    f"the request body did not arrive within {self.timeout_s:g} s ({total:,} bytes came); "
                    "send it in full, or upload large references once with POST /v1/references.",
                    headers={"Connection": "close"},
                )
                return await error_response(exc, self.metrics)(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await self._refuse(scope, receive, send, total)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, size: int):
        exc = too_large(
            f"the request body is {size:,} bytes or more, over this server's limit of {self.max_bytes:,}; send "
            "smaller images, or upload references once with POST /v1/references and send their ids."
        )
        await error_response(exc, self.metrics)(scope, receive, send)


class Guard:
    """Outermost: request metrics by endpoint and status; an exception nothing handled -> logged 500."""

    def __init__(self, app, metrics=None):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status = 500
        started = False

        async def watch(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:  # a fault: logged here, answered without a traceback
            status = 500
            if started:
                log.error("request failed after its answer began: %s", exc, exc_info=exc)
            else:
                await error_response(exc, self.metrics, log)(scope, receive, send)
        finally:
            if self.metrics is not None:
                self.metrics.request(endpoint_of(scope.get("path", "")), status, time.monotonic() - start)
