"""Pictures of faces: InstantID's keypoint conditioning image, and annotated previews for people.

:func:`draw_kps` must match InstantID's ``draw_kps`` pixel for pixel, because its IdentityNet ControlNet was
trained on exactly those images: black background, limbs from each point to the nose drawn as filled
ellipses 4 px half-thick in the colour of their outer point and dimmed to 60 %, then a filled circle of
radius 10 on each point in full colour. Integer truncation of centres, half-lengths and angles is kept too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ._optional import cv2 as _cv2
from .types import Face

#: InstantID's colours (RGB) for left eye, right eye, nose, mouth left, mouth right.
KPS_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
)
#: Limbs of the keypoint image: every point joined to the nose (index 2).
KPS_LIMBS: tuple[tuple[int, int], ...] = ((0, 2), (1, 2), (3, 2), (4, 2))
STICK_WIDTH = 4
POINT_RADIUS = 10


def draw_kps(
    image_pil: Image.Image,
    kps: np.ndarray,
    color_list: Sequence[tuple[int, int, int]] = KPS_COLORS,
) -> Image.Image:
    """InstantID's keypoint image for ``kps`` (5x2), the size of ``image_pil`` (whose pixels are not used)."""
    cv2 = _cv2()
    # The caller's dtype is kept (insightface gives float32, JSON float64): InstantID computes the limbs'
    # centres and lengths in it, and float32 vs float64 arithmetic can move a truncated centre by a pixel.
    kps = np.array(kps)
    if kps.ndim != 2 or kps.shape[1] != 2 or len(kps) < 3:
        raise ValueError(f"expected Nx2 keypoints (5 in insightface order), got shape {kps.shape}.")
    width, height = image_pil.size
    canvas = np.zeros((height, width, 3), dtype=np.float64)

    for start, end in KPS_LIMBS:
        pair = kps[[start, end]]
        x, y = pair[:, 0], pair[:, 1]  # numpy values of kps's dtype, reduced exactly as InstantID does
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        centre = (int(np.mean(x)), int(np.mean(y)))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
        canvas = cv2.fillConvexPoly(canvas, polygon, color_list[start])
    canvas = (canvas * 0.6).astype(np.uint8)

    for index, (x, y) in enumerate(kps):
        canvas = cv2.circle(canvas, (int(x), int(y)), POINT_RADIUS, color_list[index], -1)
    return Image.fromarray(canvas)


def annotate_faces(image: Image.Image, faces: Sequence[Face]) -> Image.Image:
    """A copy of ``image`` with each face's box, index and score, and its 5 keypoints (InstantID colours).

    For people checking what the analyser found, not for conditioning a model.
    """
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    line = max(1, round(min(out.size) / 200))
    radius = max(2, line + 1)
    for index, face in enumerate(faces):
        x1, y1, x2, y2 = (float(v) for v in face.bbox)
        draw.rectangle([x1, y1, x2, y2], outline=(255, 64, 64), width=line)
        draw.text((x1 + line + 1, max(0.0, y1 - 12 * line)), f"#{index} {face.score:.2f}", fill=(255, 64, 64))
        for (x, y), color in zip(face.kps, KPS_COLORS, strict=True):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color, outline=(0, 0, 0))
    return out
