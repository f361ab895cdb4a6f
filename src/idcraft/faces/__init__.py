"""Face analysis without the ``insightface`` package: detection, 5 keypoints, alignment, identity embeddings.

Two backends behind :class:`FaceAnalyser` (``detect(image) -> list[Face]``, largest first):

* ``"default"`` — offline, every model installs from PyPI (dlib + MediaPipe face mesh). Its embeddings are
  dlib's and NOT ArcFace-compatible: FaceID and InstantID refuse them (:func:`require_arcface`).
* ``"insightface"`` — insightface model packs (antelopev2 for InstantID, buffalo_l for FaceID) run with
  onnxruntime; ArcFace embeddings.

Importing this package needs only numpy and Pillow; each backend imports its own packages when built and
says ``pip install 'idcraft[faces]'`` when they are missing.
"""

from __future__ import annotations

from ..errors import FaceError
from .align import ARCFACE_TEMPLATE, arcface_template, estimate_norm, norm_crop, similarity_transform
from .analyser import (
    BUILTIN_BACKENDS,
    analyse_reference,
    analyse_references,
    backend_names,
    get_face_analyser,
    register_face_backend,
    select_face,
    shared_face_analyser,
)
from .draw import KPS_COLORS, annotate_faces, draw_kps
from .embeddings import ARCFACE_DIM, average_embeddings, cosine_similarity, require_arcface
from .resize import resize_img
from .types import (
    ARCFACE,
    DLIB_RESNET,
    KEYPOINT_NAMES,
    Face,
    FaceAnalyser,
    NoFaceError,
    SeveralFacesError,
    l2_normalize,
)

__all__ = [
    "ARCFACE",
    "ARCFACE_DIM",
    "ARCFACE_TEMPLATE",
    "BUILTIN_BACKENDS",
    "backend_names",
    "register_face_backend",
    "DLIB_RESNET",
    "KEYPOINT_NAMES",
    "KPS_COLORS",
    "Face",
    "FaceAnalyser",
    "FaceError",
    "NoFaceError",
    "SeveralFacesError",
    "analyse_reference",
    "analyse_references",
    "annotate_faces",
    "arcface_template",
    "average_embeddings",
    "cosine_similarity",
    "draw_kps",
    "estimate_norm",
    "get_face_analyser",
    "l2_normalize",
    "norm_crop",
    "require_arcface",
    "resize_img",
    "select_face",
    "shared_face_analyser",
    "similarity_transform",
]
