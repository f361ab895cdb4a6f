"""ArcFace alignment: map 5 keypoints onto insightface's template and crop.

The recognisers (and FaceID-Plus's CLIP crop) were trained on faces warped exactly this way, so the template,
the size rules and the warp flags follow insightface's ``utils/face_align.py``: a least-squares similarity
transform (rotation + uniform scale + translation, Umeyama's method; implemented here with numpy so
scikit-image is not needed) from the keypoints to the template, then ``cv2.warpAffine`` with bilinear
interpolation and a black border.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import FaceError
from ._optional import cv2 as _cv2

#: insightface's ArcFace template for a 112x112 crop (left eye, right eye, nose, mouth left, mouth right).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def arcface_template(image_size: int = 112) -> np.ndarray:
    """The 5-point template for a square crop of ``image_size`` pixels.

    Sizes that are multiples of 112 scale the 112 template (224 -> x2: FaceID-Plus's CLIP crop). Sizes that
    are multiples of 128 (but not of 112) scale it by ``size/128`` and shift it right by ``8*size/128``,
    i.e. the 112 face centred in a 128 frame (256 -> x2 and +16 px in x), as insightface's ``estimate_norm``
    does. Other sizes are refused, as insightface refuses them.
    """
    size = int(image_size)
    if size > 0 and size % 112 == 0:
        ratio, diff_x = size / 112.0, 0.0
    elif size > 0 and size % 128 == 0:
        ratio = size / 128.0
        diff_x = 8.0 * ratio
    else:
        raise ValueError(
            f"alignment size must be a multiple of 112 or 128 (112, 224, 256, 512 ...), got {image_size}."
        )
    template = ARCFACE_TEMPLATE * np.float32(ratio)
    template[:, 0] += np.float32(diff_x)
    return template


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity transform ``M`` minimising ``sum |M @ [src, 1] - dst|^2`` (Umeyama, 1991).

    Reflections are excluded (a mirrored face is not the same alignment), exactly as scikit-image's
    ``SimilarityTransform.estimate`` which insightface calls.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two matching Nx2 point sets (N >= 2), got {src.shape} and {dst.shape}.")
    n = src.shape[0]
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_c = src - src_mean
    dst_c = dst - dst_mean
    src_var = float((src_c**2).sum() / n)
    if src_var <= 1e-12:
        raise FaceError("face keypoints are degenerate (all at one point); cannot align the face.")

    cov = dst_c.T @ src_c / n
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0  # the best orthogonal map would be a reflection: take the best rotation instead
    rotation = u @ np.diag(d) @ vt
    scale = float((s * d).sum() / src_var)
    matrix = np.empty((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def estimate_norm(kps: np.ndarray, image_size: int = 112) -> np.ndarray:
    """The 2x3 matrix mapping image pixels to the aligned ``image_size`` crop (as insightface's
    ``estimate_norm``)."""
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2):
        raise ValueError(f"expected 5x2 keypoints in insightface order, got shape {kps.shape}.")
    if not np.all(np.isfinite(kps)):
        raise FaceError("face keypoints contain NaN or infinity; cannot align the face.")
    return similarity_transform(kps, arcface_template(image_size))


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine ``matrix`` to ``Nx2`` points."""
    points = np.asarray(points, dtype=np.float64)
    matrix = np.asarray(matrix, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def norm_crop(
    image: np.ndarray | Image.Image, kps: np.ndarray, image_size: int = 112
) -> np.ndarray | Image.Image:
    """The face warped onto the ArcFace template, ``image_size`` pixels square.

    Equivalent to insightface's ``face_align.norm_crop(image, landmark=kps, image_size=image_size)``:
    112 feeds the ArcFace recognisers, 224 is the crop FaceID-Plus gives CLIP. Returns the same kind of
    object it was given (array or PIL image) with the same channel order.
    """
    cv2 = _cv2()
    matrix = estimate_norm(kps, image_size)
    is_pil = isinstance(image, Image.Image)
    array = np.asarray(image.convert("RGB") if is_pil else image)
    size = int(image_size)
    warped = cv2.warpAffine(array, matrix, (size, size), borderValue=0.0)
    return Image.fromarray(warped) if is_pil else warped
