"""Two ASGI middlewares: a body-size bound, and the outermost guard that times every request and turns
an unexpected exception into a logged 500 with the API's JSON error shape (never a traceback)."""

from __future__ import annotations

import logging
import time

from .errors import error_response, too_large

log = logging.getLogger("idcraft.serve")

#: Endpoint labels of the metrics (anything else is "other", keeping the series few).
ENDPOINTS = (
    "/v1/images/generations",
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
    return "other"


class BodyLimit:
    """Refuse a body over ``max_bytes`` with 413: at once from its Content-Length, or once the bytes read
    pass the bound (chunked uploads); otherwise hand the application the body already read."""

    def __init__(self, app, max_bytes: int, metrics=None):
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, int(declared))
        chunks, total = [], 0
        while True:
            message = await receive()
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
