"""Rendering: deterministic pixels, exact keypoints, scenes that do what they say, captions that name
only coarse identity attributes."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest

from idcraft.world import (
    FINE_ATTRIBUTES,
    Scene,
    identity_from_id,
    palette,
    random_scene,
    render,
    render_reference,
)
from idcraft.world.captions import BACKGROUND_WORDS, POSITION_WORDS, SHAPE_WORDS, SIZE_WORDS
from idcraft.world.render import TILT_DEGREES
from idcraft.world.scene import BACKGROUNDS, POSES, POSITIONS

IDS = (0, 1, 5, 42, 123, 500, 777, 959)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _colour_distance(pixel, rgb) -> float:
    return float(np.linalg.norm(np.asarray(pixel, dtype=float) - np.asarray(rgb, dtype=float)))


def test_render_is_deterministic():
    identity, scene = identity_from_id(42), Scene("beach", "left", "small", "tilt_right", 2)
    first = render(identity, scene, rng=np.random.default_rng(7))
    again = render(identity, scene, rng=np.random.default_rng(7))
    assert _png(first.image) == _png(again.image)
    assert first.caption == again.caption and np.array_equal(first.kps, again.kps)
    assert _png(render(identity, scene).image) == _png(render(identity, scene).image)
    assert _png(render_reference(identity).image) == _png(render_reference(identity).image)
    assert first.image.size == (64, 64) and first.image.mode == "RGB"


@pytest.mark.parametrize("pose", ["standing", "tilt_left"])
def test_keypoints_are_exact_on_the_drawn_features(pose):
    """At 256 px the 4x supersampled drawing is seen unblurred: the pixel under each eye keypoint is the
    pupil, under the nose keypoint the nose, next to each mouth corner the mouth line."""
    for i in (0, 3, 42, 123, 500):
        identity = identity_from_id(i)
        colours = palette(identity)
        sample = render(identity, Scene("room", "centre", "large", pose), size=256)
        pixels = np.asarray(sample.image)
        for k, part in ((0, "eye"), (1, "eye"), (2, "nose")):
            x, y = np.round(sample.kps[k]).astype(int)
            assert _colour_distance(pixels[y, x], colours[part]) < 12, (i, k)
        for k in (3, 4):
            x, y = np.round(sample.kps[k]).astype(int)
            near = pixels[y - 2 : y + 3, x - 2 : x + 3].reshape(-1, 3)
            assert min(_colour_distance(p, colours["mouth"]) for p in near) < 30, (i, k)


def test_keypoints_at_64px_land_on_eyes_and_inside_the_face():
    for i in IDS:
        identity = identity_from_id(i)
        sample = render_reference(identity)
        pixels = np.asarray(sample.image)
        for k in (0, 1):
            x, y = np.round(sample.kps[k]).astype(int)
            near = pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3)
            assert min(_colour_distance(p, palette(identity)["eye"]) for p in near) < 45
        for scene in (
            Scene("city", "left", "small", "standing"),
            Scene("snow", "right", "large", "standing"),
        ):
            s = render(identity, scene)
            (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = s.kps
            x0, y0, x1, y1 = s.face_bbox
            assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in s.kps)
            assert lx < nx < rx and mlx < nx < mrx  # "left" is the image's left
            assert ly < ny < mly and abs(ly - ry) < 1e-3 and abs(mly - mry) < 1e-3
            bx0, by0, bx1, by1 = s.bbox
            assert bx0 <= x0 + 0.5 and by0 <= y0 + 0.5 and x1 - 0.5 <= bx1 and y1 - 0.5 <= by1


@pytest.mark.parametrize("pose,degrees", [("tilt_left", TILT_DEGREES), ("tilt_right", -TILT_DEGREES)])
def test_keypoint_geometry_follows_the_pose_rotation(pose, degrees):
    identity = identity_from_id(5)
    upright = render(identity, Scene("forest", "centre", "large", "standing"))
    tilted = render(identity, Scene("forest", "centre", "large", pose))
    (lx, ly), (rx, ry) = tilted.kps[:2]
    assert math.degrees(math.atan2(-(ry - ly), rx - lx)) == pytest.approx(degrees, abs=0.01)
    # distances between keypoints are preserved by the rotation
    d_up = np.linalg.norm(upright.kps[:, None] - upright.kps[None], axis=-1)
    d_tilt = np.linalg.norm(tilted.kps[:, None] - tilted.kps[None], axis=-1)
    assert np.allclose(d_up, d_tilt, atol=1e-3)


def test_scene_attributes_change_the_image_as_specified():
    one_per_shape = {identity_from_id(i).shape: identity_from_id(i) for i in range(60)}
    assert len(one_per_shape) == 6
    for identity, size in (
        (identity, size) for identity in one_per_shape.values() for size in ("small", "large")
    ):
        for pose in POSES:
            for third, position in enumerate(POSITIONS):
                # the face is where the position says; the whole character, mostly so (tilted shapes and
                # accessories reach out a little)
                sample = render(identity, Scene("desert", position, size, pose))
                lo, hi = third * 64 / 3, (third + 1) * 64 / 3
                assert lo <= sample.kps[2][0] < hi, (size, pose, position)
                x0, _, x1, _ = sample.bbox
                assert lo - 3 <= (x0 + x1) / 2 < hi + 3, (size, pose, position)
    identity = identity_from_id(123)
    small = render(identity, Scene("desert", "centre", "small")).bbox
    large = render(identity, Scene("desert", "centre", "large")).bbox
    assert (large[2] - large[0]) * (large[3] - large[1]) > 1.8 * (small[2] - small[0]) * (small[3] - small[1])
    standing = render(identity, Scene("desert", "centre", "large", "standing")).bbox
    jumping = render(identity, Scene("desert", "centre", "large", "jumping")).bbox
    assert jumping[3] < standing[3] - 4  # feet off the ground
    # each backdrop is its own picture; the top-left corner (sky/wall) never holds the character
    corners = {
        b: np.asarray(render(identity, Scene(b, "right", "small")).image)[:8, :8].mean((0, 1))
        for b in BACKGROUNDS
    }
    for a in BACKGROUNDS:
        for b in BACKGROUNDS:
            if a < b:
                assert _colour_distance(corners[a], corners[b]) > 10, (a, b)
    assert corners["night"].mean() < 80


def test_different_identities_give_different_references():
    class_mates = [
        i for i in range(960) if identity_from_id(i).coarse_class == identity_from_id(0).coarse_class
    ]
    ids = sorted(set(class_mates) | set(range(0, 960, 24)))
    images = {i: np.asarray(render_reference(identity_from_id(i)).image, dtype=np.int16) for i in ids}
    for k, a in enumerate(ids):
        for b in ids[k + 1 :]:
            assert np.abs(images[a] - images[b]).mean() > 1.0, (a, b)


def test_captions_name_coarse_attributes_and_no_fine_ones():
    fine_words = {v for values in FINE_ATTRIBUTES.values() for v in values} - {"none", "plain", "base"}
    fine_words |= {"striped", "spotted", "checked", "glasses", "ears", "antenna", "eyes", "mouth", "hat"}
    rng = np.random.default_rng(0)
    texts = set()
    for _ in range(60):
        identity = identity_from_id(int(rng.integers(960)))
        scene = random_scene(rng)
        text = render(identity, scene, rng=rng).caption
        texts.add(text)
        words = set(re.findall(r"[a-z-]+", text.lower()))
        assert identity.colour in words and SHAPE_WORDS[identity.shape] in words, text
        assert words & set(SIZE_WORDS[scene.size]), text
        assert (
            POSITION_WORDS[scene.position] in text
            and BACKGROUND_WORDS[scene.background].lower() in text.lower()
        )
        assert not words & fine_words, (text, words & fine_words)
    assert len(texts) > 50  # paraphrases vary
