"""ArcFace alignment: the similarity-transform estimate, the template size rules, and the warp."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from idcraft.errors import FaceError
from idcraft.faces import ARCFACE_TEMPLATE, arcface_template, estimate_norm, norm_crop, similarity_transform
from idcraft.faces.align import transform_points


def similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    angle = math.radians(degrees)
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return np.hstack([rotation, [[tx], [ty]]])


def test_recovers_a_known_similarity_transform():
    # Keypoints of a face that is the template scaled by 2.3, turned by 17 degrees and moved.
    forward = similarity(2.3, 17.0, 140.0, 95.0)
    kps = transform_points(ARCFACE_TEMPLATE, forward)
    matrix = estimate_norm(kps, 112)
    # estimate_norm maps image -> template, i.e. the inverse of `forward`.
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
    np.testing.assert_allclose(matrix, inverse, atol=1e-9)
    np.testing.assert_allclose(transform_points(kps, matrix), ARCFACE_TEMPLATE, atol=1e-4)


def test_least_squares_fit_matches_scikit_image():
    transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(3)
    for _ in range(20):
        src = rng.uniform(0, 500, size=(5, 2))
        dst = rng.uniform(0, 112, size=(5, 2))
        if hasattr(transform.SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
            reference = transform.SimilarityTransform.from_estimate(src, dst)
        else:
            reference = transform.SimilarityTransform()
            reference.estimate(src, dst)
        np.testing.assert_allclose(similarity_transform(src, dst), reference.params[:2], atol=1e-8)


def test_mirrored_keypoints_give_a_rotation_not_a_reflection():
    mirrored = ARCFACE_TEMPLATE * np.array([-1.0, 1.0]) + np.array([200.0, 0.0])
    matrix = estimate_norm(mirrored, 112)
    assert np.linalg.det(matrix[:, :2]) > 0


@pytest.mark.parametrize(
    ("size", "scale", "shift_x"),
    [(112, 1.0, 0.0), (224, 2.0, 0.0), (256, 2.0, 16.0), (128, 1.0, 8.0), (512, 4.0, 32.0)],
)
def test_template_size_rules(size, scale, shift_x):
    # insightface: multiples of 112 scale the template; other multiples of 128 scale by size/128 and
    # shift right by 8*size/128 (the 112 face centred in a 128 frame).
    expected = ARCFACE_TEMPLATE * scale + np.array([shift_x, 0.0])
    np.testing.assert_allclose(arcface_template(size), expected, rtol=1e-6)
    kps = transform_points(ARCFACE_TEMPLATE, similarity(1.7, -8.0, 30.0, 40.0))
    np.testing.assert_allclose(transform_points(kps, estimate_norm(kps, size)), expected, atol=1e-3)


@pytest.mark.parametrize("size", [100, 0, 300])
def test_unsupported_sizes_are_refused(size):
    with pytest.raises(ValueError, match="multiple of 112 or 128"):
        arcface_template(size)


def test_degenerate_keypoints_raise_face_error():
    with pytest.raises(FaceError, match="degenerate"):
        estimate_norm(np.full((5, 2), 50.0), 112)
    with pytest.raises(FaceError, match="NaN"):
        estimate_norm(np.full((5, 2), np.nan), 112)


def test_norm_crop_undoes_a_known_warp():
    pytest.importorskip("cv2")
    import cv2

    # A textured 112x112 "aligned face", warped into a bigger photo by a known similarity transform.
    rng = np.random.default_rng(0)
    aligned = cv2.resize(
        rng.integers(0, 256, (14, 14, 3), dtype=np.uint8), (112, 112), interpolation=cv2.INTER_CUBIC
    )
    forward = similarity(2.0, 25.0, 180.0, 60.0)
    photo = cv2.warpAffine(aligned, forward, (480, 400), flags=cv2.INTER_CUBIC)
    kps = transform_points(ARCFACE_TEMPLATE, forward)

    recovered = norm_crop(photo, kps, 112)
    assert recovered.shape == (112, 112, 3) and recovered.dtype == np.uint8
    inner = (slice(8, -8), slice(8, -8))  # away from the border, where both warps interpolate with black
    error = np.abs(recovered[inner].astype(int) - aligned[inner].astype(int))
    assert error.mean() < 3.0, error.mean()

    # 224 is the same crop at twice the resolution (FaceID-Plus's CLIP input).
    crop224 = norm_crop(photo, kps, 224)
    halved = cv2.resize(crop224, (112, 112), interpolation=cv2.INTER_AREA)
    assert np.abs(halved[inner].astype(int) - aligned[inner].astype(int)).mean() < 6.0


def test_norm_crop_keeps_the_input_type():
    pytest.importorskip("cv2")
    image = Image.new("RGB", (300, 300), (10, 200, 30))
    kps = ARCFACE_TEMPLATE * 2 + 20
    out = norm_crop(image, kps, 224)
    assert isinstance(out, Image.Image) and out.size == (224, 224)
    assert out.getpixel((112, 112)) == (10, 200, 30)
