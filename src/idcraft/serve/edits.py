"""``POST /v1/images/edits``: OpenAI's way to send images with a prompt, read as a reference generation.

The body is multipart form data: ``image`` (one file, or several -- the ``openai`` package sends a list
as repeated ``image[]`` fields) are the references; ``prompt``, ``n``, ``size``, ``response_format``,
``model``, ``quality``, ``style``, ``user`` and idcraft's own fields (``method``, ``scale``, ``seed``,
``steps``, ``guidance``, ``negative_prompt``, ...) are text fields, checked by the same
:class:`~.schemas.ImageRequest` as ``POST /v1/images/generations``. There is no inpainting: a ``mask`` is
refused rather than ignored.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from .errors import bad_request
from .schemas import ImageRequest

#: Form fields holding reference images (files), and reference ids from ``POST /v1/references`` (text).
IMAGE_FIELDS = ("image", "image[]")
REFERENCE_FIELDS = ("references", "references[]")
#: Fields whose text is JSON (five [x, y] per face).
JSON_FIELDS = ("keypoints",)


async def edit_request(request: Request) -> ImageRequest:
    """The multipart body of ``POST /v1/images/edits`` as an :class:`ImageRequest` (400 if it is not one)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request(
            "POST /v1/images/edits takes multipart form data: the reference image(s) as file field 'image' "
            "and the prompt as a text field (JSON bodies go to /v1/images/generations)."
        )
    form = await request.form()
    if "mask" in form:
        raise bad_request(
            "mask: inpainting is not supported; 'image' is the reference whose subject is kept in a new image."
        )
    references: list[str] = []
    for name in REFERENCE_FIELDS:
        references.extend(str(v) for v in form.getlist(name))
    for name in IMAGE_FIELDS:
        for upload in form.getlist(name):
            if isinstance(upload, str):
                raise bad_request(f"{name}: send the reference image as a file, not as text.")
            references.append(base64.b64encode(await upload.read()).decode("ascii"))
    if not references:
        raise bad_request("image: send the reference image(s) as file field 'image' (several: 'image[]').")
    values: dict[str, Any] = {"references": references}
    for name in form:
        if name in IMAGE_FIELDS or name in REFERENCE_FIELDS:
            continue
        given = form.getlist(name)
        if len(given) > 1:
            raise bad_request(f"{name}: given {len(given)} times; send it once.")
        value = given[0]
        if not isinstance(value, str):
            raise bad_request(f"{name}: expected a text field, got a file.")
        if value == "":
            continue  # an empty form input: the default
        values[name] = _json(name, value) if name in JSON_FIELDS else value
    try:
        return ImageRequest.model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _json(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise bad_request(f"{name}: not valid JSON ({exc}).") from exc
