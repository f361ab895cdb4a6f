"""The one place where failures become HTTP answers: ``{"error": {"message", "type"}}`` and a status.

Bad input is the client's to fix and gets a 4xx that says what was wrong (idcraft's own messages, which
already name the problem and the fix); a 500 is kept for real faults, logged with its traceback, and its
message says no more than that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import (
    Cancelled,
    CheckpointError,
    FaceError,
    IdcraftError,
    ImageError,
    IncompatibleAdapterError,
    ModelLoadError,
    OutputError,
)
from ..faces.types import NoFaceError, SeveralFacesError


class ApiError(Exception):
    """A refusal with its HTTP status, error type and message (extra headers: Retry-After...)."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Answer:
    status: int
    kind: str
    message: str
    headers: dict


#: idcraft's error classes, most specific first: (class, status, type).
STATUS_OF: tuple[tuple[type[BaseException], int, str], ...] = (
    # stopped on purpose (shutdown, a deadline): the server's doing, said as it is
    (Cancelled, 503, "cancelled"),
    (NoFaceError, 422, "no_face"),
    (SeveralFacesError, 422, "several_faces"),
    (FaceError, 422, "face_error"),
    (ImageError, 400, "invalid_image"),
    # the server's models are its own: a loading problem during a request is a fault, not bad input
    (CheckpointError, 500, "server_error"),
    (IncompatibleAdapterError, 500, "server_error"),
    (ModelLoadError, 500, "server_error"),
    (OutputError, 500, "server_error"),
    (IdcraftError, 400, "invalid_request"),
)

INTERNAL = "internal error; the server logged the details."


def answer_for(exc: BaseException) -> Answer:
    """The status, type and message a failure is answered with."""
    if isinstance(exc, ApiError):
        return Answer(exc.status, exc.kind, exc.message, dict(exc.headers))
    for cls, status, kind in STATUS_OF:
        if isinstance(exc, cls):
            message = api_wording(str(exc)) if status < 500 or kind == "cancelled" else INTERNAL
            return Answer(status, kind, message, {})
    return Answer(500, "server_error", INTERNAL, {})


#: idcraft's messages name command-line flags; over HTTP they name the API's fields.
API_FIELDS = {
    "num-images": "n",
    "width": "width (from size)",
    "height": "height (from size)",
    "face-embedding": "face_embeddings",
    "aligned-face": "aligned_faces",
    "face-parsing": "face_parsings",
}
FLAG = re.compile(r"--([a-z][a-z0-9-]*)")


def api_wording(message: str) -> str:
    """``--multi-person: not used by ...`` -> ``multi_person: not used by ...``."""
    return FLAG.sub(lambda m: API_FIELDS.get(m.group(1), m.group(1).replace("-", "_")), message)


def error_body(kind: str, message: str) -> dict:
    return {"error": {"message": message, "type": kind}}


# Refusals the server makes itself, named once.
def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def too_large(message: str) -> ApiError:
    return ApiError(413, "too_large", message)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        "this server needs a bearer token: send Authorization: Bearer <token>.",
        headers={"WWW-Authenticate": "Bearer"},
    )


def error_response(exc: BaseException, metrics=None, log=None):
    """The JSON answer to ``exc``, counted in ``metrics``; a real fault is logged with its traceback."""
    from fastapi.responses import JSONResponse

    answer = answer_for(exc)
    if metrics is not None:
        metrics.error(answer.kind, answer.status)
    if answer.status >= 500 and not isinstance(exc, (ApiError, Cancelled)) and log is not None:
        # a cancelled generation (shutdown, timeout) is an outcome the server chose, not a fault
        log.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return JSONResponse(
        error_body(answer.kind, answer.message), status_code=answer.status, headers=answer.headers
    )
