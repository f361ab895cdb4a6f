"""PuLID's stage inputs over HTTP: saved face embeddings, aligned faces and face-parsing label maps.

The command line's ``--face-embedding``, ``--aligned-face`` and ``--face-parsing`` as request fields
``face_embeddings``, ``aligned_faces`` and ``face_parsings``: lists, one item per face in reference order.
An embedding is base64 ``.npy`` bytes or a JSON list of its 512 numbers; an aligned face or a label map
is a base64 PNG (raw or a ``data:`` URL) or the id of an upload (``POST /v1/references``), resolved the
way references are. Each is checked here, before the request takes a place in the queue, with a 400 that
names the field and item; the engine then checks how they fit together (one per face).

Their content hashes enter the identity-cache key (:func:`~.cache.identity_key`): two requests with
different aligned faces never share an encoding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import bad_request
from .images import check_header, content_hash, decode

#: Values of one embedding: the 512-d ArcFace / antelopev2 vector every face method reads.
EMBEDDING_SIZE = 512

#: Request field -> the command-line flag of the same input (for error messages and docs).
FIELDS = {
    "face_embeddings": "--face-embedding",
    "aligned_faces": "--aligned-face",
    "face_parsings": "--face-parsing",
}


@dataclass
class StageInputs:
    """A request's stage inputs, decoded and checked, with the content hashes the cache key reads."""

    face_embeddings: list[np.ndarray] | None = None
    aligned_faces: list[np.ndarray] | None = None
    face_parsings: list[np.ndarray] | None = None
    hashes: dict[str, list[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.hashes)


def given(body: Any) -> bool:
    """Whether the request body carries any stage input."""
    return any(getattr(body, name) for name in FIELDS)


def read_stages(body: Any, resolve: Callable[[str, str], bytes], max_pixels: int) -> StageInputs:
    """Every stage input of ``body``, checked; ``resolve(item, what)`` turns a base64 item or an upload
    id into its bytes (the references' own path: 404 for an unknown id, 400 for bad base64)."""
    out = StageInputs()
    if body.face_embeddings:
        out.face_embeddings = [
            _embedding(item, f"face_embeddings[{i}]") for i, item in enumerate(body.face_embeddings)
        ]
        out.hashes["face_embeddings"] = [_array_hash(e) for e in out.face_embeddings]
    for name, read in (("aligned_faces", _aligned_face), ("face_parsings", _label_map)):
        items: Sequence[str] | None = getattr(body, name)
        if not items:
            continue
        data = [resolve(item, f"{name}[{i}]") for i, item in enumerate(items)]
        setattr(out, name, [read(d, max_pixels, f"{name}[{i}]") for i, d in enumerate(data)])
        out.hashes[name] = [content_hash(d) for d in data]
    return out


def _embedding(item: Any, what: str) -> np.ndarray:
    """A JSON list of numbers, or base64 ``.npy`` bytes (no pickles), as 512 finite float32 values."""
    if isinstance(item, str):
        try:
            data = base64.b64decode(
                item.split(",", 1)[1] if item.startswith("data:") else item, validate=True
            )
            value = np.load(io.BytesIO(data), allow_pickle=False)
        except (binascii.Error, ValueError, OSError, EOFError) as exc:
            raise bad_request(
                f"{what}: expected a JSON list of {EMBEDDING_SIZE} numbers or base64 .npy bytes ({exc})."
            ) from None
    else:
        value = item
    try:
        vector = np.asarray(value, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise bad_request(
            f"{what}: expected a JSON list of {EMBEDDING_SIZE} numbers or base64 .npy bytes."
        ) from None
    if vector.size != EMBEDDING_SIZE:
        raise bad_request(
            f"{what}: an embedding has {EMBEDDING_SIZE} values (the raw ArcFace / antelopev2 vector, as "
            f"`idcraft faces --save-embeddings` writes it), got {vector.size}."
        )
    if not np.isfinite(vector).all():
        raise bad_request(f"{what}: every value must be a finite number.")
    return vector


def _aligned_face(data: bytes, max_pixels: int, what: str) -> np.ndarray:
    from ..pulid.preprocess import check_aligned

    return check_aligned(np.asarray(decode(data, max_pixels, what)), what)


def _label_map(data: bytes, max_pixels: int, what: str) -> np.ndarray:
    """Labels are read from the PNG's own values (mode L/P/I), never through an RGB conversion, which
    would turn a palette image's labels into colours."""
    from PIL import Image

    from ..pulid.preprocess import check_parsing

    check_header(data, max_pixels, what)
    with Image.open(io.BytesIO(data)) as image:
        labels = np.asarray(image)
    return check_parsing(labels, what)


def _array_hash(vector: np.ndarray) -> str:
    """The same numbers give the same key whether they came as JSON or as ``.npy`` bytes."""
    return hashlib.sha256(np.ascontiguousarray(vector, dtype=np.float32).tobytes()).hexdigest()
