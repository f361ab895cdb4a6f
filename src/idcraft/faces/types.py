"""What a face analyser returns, and the one interface every backend implements.

A :class:`Face` always carries 5 keypoints in insightface order because everything downstream is built on
them: ArcFace alignment (``norm_crop``), FaceID-Plus's 224 px CLIP crop and InstantID's keypoint image. The
embedding is optional and labelled: FaceID and InstantID were trained on ArcFace embeddings, so an
embedding from another recogniser (the offline default backend's dlib ResNet) must never reach them
unnoticed; :attr:`Face.is_arcface` and :func:`idcraft.faces.require_arcface` make that check explicit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FaceError
from ..images import ImageInput

#: ``Face.embedding_kind`` of the insightface ArcFace recognisers (glintr100, w600k_r50, ...): 512-d,
#: the space FaceID and InstantID were trained on.
ARCFACE = "arcface"
#: ``Face.embedding_kind`` of dlib's ResNet face descriptor (128-d). Good for telling people apart, but
#: NOT ArcFace-compatible: FaceID / InstantID must refuse it.
DLIB_RESNET = "dlib-resnet"

#: Names of the 5 keypoints, in insightface order. "Left" and "right" are as seen in the image (the
#: subject's right eye is the image-left one), which is how insightface's detectors label them.
KEYPOINT_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


class NoFaceError(FaceError):
    """An image was readable but no face was found in it (or not the requested one)."""


class SeveralFacesError(FaceError):
    """A reference photo shows several faces and no face index said which one is the identity: taking
    the largest silently could give the wrong person, so generation asks instead."""


@dataclass(eq=False)
class Face:
    """One detected face.

    ``bbox`` is ``(x1, y1, x2, y2)`` and ``kps`` is ``5x2`` (see :data:`KEYPOINT_NAMES`), both in pixels of
    the upright image the analyser was given. ``embedding`` is the recogniser's raw output (not normalised;
    InstantID uses it raw, FaceID uses :attr:`normed_embedding`). ``embedding_kind`` says which family of
    recogniser made it (:data:`ARCFACE` or :data:`DLIB_RESNET`) and ``embedding_model`` the model file,
    e.g. ``glintr100.onnx`` (antelopev2, InstantID) or ``w600k_r50.onnx`` (buffalo_l, FaceID).
    """

    bbox: np.ndarray
    score: float
    kps: np.ndarray
    embedding: np.ndarray | None = None
    embedding_kind: str | None = None
    embedding_model: str | None = None
    backend: str = ""

    def __post_init__(self) -> None:
        self.bbox = np.asarray(self.bbox, dtype=np.float32).reshape(-1)
        self.kps = np.asarray(self.kps, dtype=np.float32)
        if self.bbox.shape != (4,):
            raise ValueError(f"Face.bbox must have 4 values (x1, y1, x2, y2), got shape {self.bbox.shape}.")
        if self.kps.shape != (5, 2):
            raise ValueError(f"Face.kps must be 5x2 (insightface order), got shape {self.kps.shape}.")
        self.score = float(self.score)
        if self.embedding is not None:
            self.embedding = np.asarray(self.embedding, dtype=np.float32).reshape(-1)
            if self.embedding_kind is None:
                raise ValueError("Face.embedding_kind must say which recogniser made the embedding.")

    @property
    def area(self) -> float:
        """Box area in pixels; faces are ranked by it (largest first)."""
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    @property
    def is_arcface(self) -> bool:
        """True when the embedding exists and came from an ArcFace recogniser (usable by FaceID/InstantID)."""
        return self.embedding is not None and self.embedding_kind == ARCFACE

    @property
    def normed_embedding(self) -> np.ndarray:
        """The embedding scaled to unit L2 norm (insightface's ``Face.normed_embedding``)."""
        if self.embedding is None:
            raise FaceError("this face has no embedding (the analyser ran without a recogniser).")
        return l2_normalize(self.embedding)

    def to_dict(self, *, embedding: bool = False) -> dict[str, Any]:
        """A JSON-ready summary: box, score and keypoints rounded to 0.01 px (plus the embedding if asked)."""
        out: dict[str, Any] = {
            "bbox": [round(float(v), 2) for v in self.bbox],
            "score": round(self.score, 4),
            "kps": [[round(float(x), 2), round(float(y), 2)] for x, y in self.kps],
        }
        if embedding and self.embedding is not None:
            out["embedding"] = [float(v) for v in self.embedding]
            out["embedding_kind"] = self.embedding_kind
            out["embedding_model"] = self.embedding_model
        return out


def l2_normalize(vector: np.ndarray) -> np.ndarray:
    """``vector / ||vector||`` in float32; a zero vector is an error (it has no direction to compare)."""
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise FaceError("cannot normalise an embedding of zero (or non-finite) length.")
    return vector / norm


def sort_largest_first(faces: list[Face]) -> list[Face]:
    """Faces ordered by box area, largest first (ties keep the detector's order, i.e. by score)."""
    return sorted(faces, key=lambda face: -face.area)


class FaceAnalyser(ABC):
    """A face detector + keypoints + (optionally) recogniser behind one call.

    Backends: :class:`~idcraft.faces.default_backend.DefaultFaceAnalyser` (offline, from PyPI packages,
    embeddings NOT ArcFace-compatible) and :class:`~idcraft.faces.insightface_pack.InsightFacePackAnalyser`
    (insightface model packs run with onnxruntime; ArcFace embeddings). Use
    :func:`idcraft.faces.get_face_analyser` to build one.
    """

    #: Short backend name recorded on every face and printed by ``idcraft faces``.
    name: str = "face-analyser"
    #: ``Face.embedding_kind`` this analyser produces, or None when it has no recogniser.
    embedding_kind: str | None = None
    #: Most faces it can find in one image (``None``: no limit). A detector of one subject per image
    #: cannot split a group photo into people, which ``--multi-person`` needs to say rather than "no face".
    max_faces: int | None = None

    @abstractmethod
    def detect(self, image: ImageInput, *, embed: bool = True) -> list[Face]:
        """All faces in ``image``, largest first; an empty list when there is none.

        ``image`` is anything :func:`idcraft.images.load_image` accepts (path, PIL image, RGB array).
        ``embed=False`` skips the recogniser, which is most of the cost when only boxes are needed.
        """

    @abstractmethod
    def search_limits(self, width: int, height: int) -> str:
        """One sentence saying what was searched in a ``width x height`` image and the smallest face size
        that search can find there; used in the "no face found" error."""

    def describe(self) -> str:
        """A one-line description of the models (and execution providers) in use."""
        return self.name
