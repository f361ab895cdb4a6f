"""draw_kps against InstantID's own ``draw_kps`` arithmetic, pixel for pixel, on random keypoints.

IdentityNet was trained on images drawn by InstantID's function; a centre truncated one pixel differently
(float32 vs float64 means) changes the conditioning. The official formula is written out below from its
description (black float canvas, ``np.array(kps)`` in the caller's dtype, ``np.mean`` of each limb's pair,
``** 0.5`` length, ``cv2.ellipse2Poly`` + ``fillConvexPoly``, dim to 60 %, circles of radius 10).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from idcraft.faces import KPS_COLORS, draw_kps

cv2 = pytest.importorskip("cv2")


def official_draw_kps(image_pil, kps, color_list=KPS_COLORS):
    """InstantID's draw_kps, step for step (pipeline_stable_diffusion_xl_instantid.py)."""
    stickwidth = 4
    limb_seq = np.array([[0, 2], [1, 2], [3, 2], [4, 2]])
    kps = np.array(kps)
    w, h = image_pil.size
    out_img = np.zeros([h, w, 3])
    for i in range(len(limb_seq)):
        index = limb_seq[i]
        color = color_list[index[0]]
        x = kps[index][:, 0]
        y = kps[index][:, 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly(
            (int(np.mean(x)), int(np.mean(y))), (int(length / 2), stickwidth), int(angle), 0, 360, 1
        )
        out_img = cv2.fillConvexPoly(out_img.copy(), polygon, color)
    out_img = (out_img * 0.6).astype(np.uint8)
    for idx_kp, kp in enumerate(kps):
        color = color_list[idx_kp]
        x, y = kp
        out_img = cv2.circle(out_img.copy(), (int(x), int(y)), 10, color, -1)
    return Image.fromarray(out_img.astype(np.uint8))


def _cases(count: int, seed: int):
    """Random canvases of 64-256 px and five keypoints with one decimal, as JSON files and analysers give."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        width, height = (int(v) for v in rng.integers(64, 257, size=2))
        kps = np.round(rng.uniform(0, 1, size=(5, 2)) * [width, height], 1)
        yield Image.new("RGB", (width, height)), kps


def test_float32_mean_is_the_official_one():
    """The case that motivated this: float32 y = 22.4, 35.6 average to exactly 29.0 in float32 arithmetic
    (InstantID: centre row 29), but to 28.999999 once widened to float64 (row 28)."""
    kps = np.array([[10, 22.4], [50, 22.4], [30, 35.6], [12, 60], [48, 60]], dtype=np.float32)
    canvas = Image.new("RGB", (64, 72))
    assert np.array_equal(np.asarray(draw_kps(canvas, kps)), np.asarray(official_draw_kps(canvas, kps)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_identical_to_official_on_random_keypoints(dtype):
    mismatches = []
    for n, (canvas, kps) in enumerate(_cases(1500, seed=1 if dtype is np.float64 else 2)):
        kps = kps.astype(dtype)
        ours, official = np.asarray(draw_kps(canvas, kps)), np.asarray(official_draw_kps(canvas, kps))
        if not np.array_equal(ours, official):
            mismatches.append((n, kps.tolist()))
    assert not mismatches, (
        f"{len(mismatches)} of 1500 {np.dtype(dtype).name} cases differ, e.g. {mismatches[:2]}"
    )


def test_lists_and_integer_keypoints_match_official():
    canvas = Image.new("RGB", (128, 96))
    for kps in (
        [[30, 30], [90, 31], [60, 50], [35, 75], [88, 74]],
        [[30.5, 30.1], [90.3, 31.7], [60.9, 50.5], [35.5, 75.5], [88.1, 74.9]],
    ):
        assert np.array_equal(np.asarray(draw_kps(canvas, kps)), np.asarray(official_draw_kps(canvas, kps)))
