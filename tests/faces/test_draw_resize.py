"""InstantID's keypoint image and reference resize rule, checked against their documented pixel rules."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from idcraft.errors import ImageError
from idcraft.faces import KPS_COLORS, Face, annotate_faces, draw_kps, resize_img

KPS = np.array([[100.0, 80.0], [160.0, 80.0], [130.0, 120.0], [105.0, 160.0], [155.0, 160.0]])


def test_keypoint_image_pixels():
    pytest.importorskip("cv2")
    out = np.asarray(draw_kps(Image.new("RGB", (256, 200), (90, 90, 90)), KPS))
    assert out.shape == (200, 256, 3) and out.dtype == np.uint8
    for (x, y), color in zip(KPS, KPS_COLORS, strict=True):
        assert tuple(out[int(y), int(x)]) == color  # filled circle, full colour
        assert tuple(out[int(y), int(x) + 9]) == color  # radius 10
    # Limbs join each point to the nose in the outer point's colour at 60 %: 255 * 0.6 = 153.
    mid = ((KPS[0] + KPS[2]) / 2).astype(int)
    assert tuple(out[mid[1], mid[0]]) == (153, 0, 0)
    mid = ((KPS[4] + KPS[2]) / 2).astype(int)
    assert tuple(out[mid[1], mid[0]]) == (153, 0, 153)
    # Sticks are 4 px half-thick: 8 px across the limb from its axis it is background (black).
    direction = (KPS[2] - KPS[0]) / np.linalg.norm(KPS[2] - KPS[0])
    side = (((KPS[0] + KPS[2]) / 2) + 8 * np.array([-direction[1], direction[0]])).astype(int)
    assert tuple(out[side[1], side[0]]) == (0, 0, 0)
    assert tuple(out[5, 5]) == (0, 0, 0)  # the input's pixels are not used
    # Only the 5 colours and their dimmed versions (plus black) appear: no antialiasing.
    allowed = {(0, 0, 0)} | set(KPS_COLORS) | {tuple(int(c * 0.6) for c in color) for color in KPS_COLORS}
    assert {tuple(p) for p in out.reshape(-1, 3)} <= allowed


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1000, 800), (1280, 1024)),  # short side -> 1024, long side -> 1280: already there
        ((500, 500), (1280, 1280)),  # InstantID's quirk: the second step scales the long side to 1280
        ((3000, 1000), (1280, 384)),  # 1280 x 426.7 -> floored to multiples of 64
        ((700, 1100), (768, 1280)),  # portrait: ~815 -> 768
    ],
)
def test_instantid_resize_rule(size, expected):
    assert resize_img(Image.new("RGB", size)).size == expected


def test_resize_pads_onto_a_white_square():
    image = Image.new("RGB", (3000, 1000), (10, 20, 30))
    out = np.asarray(resize_img(image, pad_to_max_side=True))
    assert out.shape == (1280, 1280, 3)
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[447, 640]) == (255, 255, 255)
    assert tuple(out[448, 640]) == (10, 20, 30) and tuple(out[448 + 383, 640]) == (10, 20, 30)
    assert tuple(out[448 + 384, 640]) == (255, 255, 255)


def test_resize_explicit_size_and_refusals():
    assert resize_img(Image.new("RGB", (300, 200)), size=(640, 512)).size == (640, 512)
    with pytest.raises(ImageError, match="too elongated"):
        resize_img(Image.new("RGB", (10000, 50)))


def test_annotation_draws_boxes_and_points():
    image = Image.new("RGB", (256, 200), (128, 128, 128))
    face = Face(bbox=(90, 60, 170, 180), score=0.97, kps=KPS)
    out = np.asarray(annotate_faces(image, [face]))
    assert tuple(out[60, 130]) != (128, 128, 128)  # box edge
    for (x, y), color in zip(KPS, KPS_COLORS, strict=True):
        assert tuple(out[int(y), int(x)]) == color
    assert np.asarray(image).mean() == 128  # the input is not modified
