"""A request's identity inputs -> one :class:`~idcraft.pulid.encoder.FaceStages` per reference face.

What each face needs, and where it comes from (a stage given skips the ones before it):

* the raw antelopev2 embedding: ``--face-embedding`` (i-th file for the i-th face), else face analysis of
  the i-th ``--reference`` photo (largest face, or ``--face-index``);
* the 512x512 aligned face: ``--aligned-face``, else the photo and the detected keypoints (the encoder
  aligns them);
* the label map: ``--face-parsing``, else BiSeNet inside the encoder.

Several faces are one identity whose tokens the IDFormer concatenates, as the official code does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import IdcraftError
from ..requests import GenerationRequest
from .encoder import FaceStages


def _rgb(item: Any, what: str) -> np.ndarray:
    from ..images import load_image

    return np.asarray(load_image(item).convert("RGB"), dtype=np.uint8)


def load_labels(item: Any) -> np.ndarray:
    """A label map from a PNG path (palette or grey values = labels) or an array."""
    if isinstance(item, np.ndarray):
        return item
    from PIL import Image

    try:
        image = item if isinstance(item, Image.Image) else Image.open(item)
        array = np.asarray(image)
    except OSError as exc:
        raise IdcraftError(f"--face-parsing {item}: cannot read this label map ({exc}).") from exc
    return array[..., 0] if array.ndim == 3 else array


def request_faces(
    request: GenerationRequest, backend: str, models: str | None, method: str
) -> list[FaceStages]:
    """The request's faces, each with the stages it gives; detection only where a stage needs it."""
    references = list(request.references)
    embeddings = list(request.face_embeddings or [])
    aligned = list(request.aligned_faces or [])
    parsings = list(request.face_parsings or [])
    count = max(len(references), len(embeddings), len(aligned))
    if count == 0:
        raise IdcraftError(
            f"{method} needs a reference photo with a face, or --face-embedding with --aligned-face."
        )
    for flag, items in (("--face-embedding", embeddings), ("--aligned-face", aligned)):
        if items and len(items) != count:
            raise IdcraftError(
                f"{len(items)} {flag} given for {count} reference face(s): give one per face, in the same order."
            )
    if parsings and len(parsings) != count:
        raise IdcraftError(
            f"{len(parsings)} --face-parsing given for {count} face(s): give one per aligned face."
        )
    faces = []
    for i in range(count):
        face = FaceStages(
            embedding=embeddings[i] if embeddings else None,
            aligned_face=_rgb(aligned[i], "--aligned-face") if aligned else None,
            parsing=load_labels(parsings[i]) if parsings else None,
        )
        if face.embedding is None or face.aligned_face is None:
            if i >= len(references):
                missing = "--face-embedding" if face.embedding is None else "--aligned-face"
                raise IdcraftError(
                    f"face {i + 1} has no reference photo to detect it in: give {missing} too."
                )
            _detect(face, references[i], request.face_index, backend, models, method)
        faces.append(face)
    return faces


def _detect(
    face: FaceStages, reference: Any, face_index: int, backend: str, models: str | None, method: str
) -> None:
    """Fill the photo, keypoints and (if missing) raw embedding from face analysis of ``reference``."""
    from ..faces import analyse_reference, require_arcface
    from ..images import load_image

    image = load_image(reference).convert("RGB")
    found = analyse_reference(image, backend, face_index, models_dir=models, embed=face.embedding is None)
    face.photo = np.asarray(image, dtype=np.uint8)
    face.kps = np.asarray(found.kps, dtype=np.float32)
    if face.embedding is None:
        face.embedding = require_arcface(found, method)
