"""The offline default backend on real public-domain photos (see tests/data/PROVENANCE.md)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from idcraft import images
from idcraft.errors import FaceError, ImageError
from idcraft.faces import (
    DLIB_RESNET,
    NoFaceError,
    SeveralFacesError,
    analyse_reference,
    cosine_similarity,
    require_arcface,
)

# Keypoints checked by eye on annotated, enlarged copies of the test photos (left eye, right eye, nose tip,
# mouth left, mouth right; pixels of the stored 256 px images).
EXPECTED_KPS = {
    "astronaut.jpg": [[101.3, 50.5], [123.0, 51.5], [111.2, 64.1], [99.6, 69.1], [123.0, 70.2]],
    "grace_hopper.jpg": [[92.9, 82.2], [130.8, 80.2], [113.9, 103.0], [98.1, 118.0], [130.1, 116.1]],
}


def check_face_geometry(face, image_size):
    left_eye, right_eye, nose, mouth_left, mouth_right = face.kps
    x1, y1, x2, y2 = face.bbox
    width, height = image_size
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    for x, y in face.kps:
        assert x1 <= x <= x2 and y1 <= y <= y2, "keypoints inside the box"
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0], "left/right as seen in the image"
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1]), "eyes, nose, mouth"
    assert left_eye[0] < nose[0] < right_eye[0]
    eye_distance = np.linalg.norm(right_eye - left_eye)
    assert 0.25 < eye_distance / (x2 - x1) < 0.6


@pytest.mark.parametrize("name", sorted(EXPECTED_KPS))
def test_finds_the_face_and_its_keypoints(default_analyser, name, astronaut_path):
    path = astronaut_path.parent / name
    faces = default_analyser.detect(path)
    assert len(faces) == 1
    face = faces[0]
    check_face_geometry(face, Image.open(path).size)
    expected = np.array(EXPECTED_KPS[name])
    eye_distance = np.linalg.norm(expected[1] - expected[0])
    assert np.abs(face.kps - expected).max() < 0.15 * eye_distance
    assert 0.5 <= face.score <= 1.0
    assert face.backend == "default"
    assert face.embedding_kind == DLIB_RESNET and not face.is_arcface
    assert face.embedding.shape == (128,)


def test_photo_without_face_fails_cleanly(default_analyser, gradient_path):
    assert default_analyser.detect(gradient_path) == []
    with pytest.raises(NoFaceError) as info:
        analyse_reference(gradient_path, default_analyser)
    message = str(info.value)
    assert str(gradient_path) in message and "no face found" in message
    assert "640 and 1280 px" in message and "down to about 15 px in this 300x200 image" in message


def variants(path):
    """The astronaut mirrored, and cropped + rescaled: the same person in other pixels."""
    image = Image.open(path).convert("RGB")
    mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    cropped = image.crop((40, 0, 200, 150)).resize((240, 225), Image.Resampling.BICUBIC)
    return mirrored, cropped


def test_same_person_is_closer_than_another_person(default_analyser, astronaut_path, hopper_path):
    astronaut = analyse_reference(astronaut_path, default_analyser)
    hopper = analyse_reference(hopper_path, default_analyser)
    for variant in variants(astronaut_path):
        same = analyse_reference(variant, default_analyser)
        assert cosine_similarity(astronaut, same) > cosine_similarity(astronaut, hopper)
        assert cosine_similarity(same, hopper) < cosine_similarity(astronaut, same)
        # dlib's own rule: same person below 0.6 Euclidean distance.
        assert np.linalg.norm(astronaut.embedding - same.embedding) < 0.6
    assert np.linalg.norm(astronaut.embedding - hopper.embedding) > 0.6


def test_mirrored_photo_mirrors_the_keypoints(default_analyser, astronaut_path):
    face = analyse_reference(astronaut_path, default_analyser)
    mirrored = analyse_reference(variants(astronaut_path)[0], default_analyser)
    width = Image.open(astronaut_path).size[0]
    # Mirroring swaps which eye / mouth corner is on the left: map back and compare.
    flipped = mirrored.kps[[1, 0, 2, 4, 3]] * np.array([-1, 1]) + np.array([width, 0])
    assert np.abs(flipped - face.kps).max() < 2.5


def test_refuses_to_serve_arcface_methods(default_analyser, astronaut_path):
    face = analyse_reference(astronaut_path, default_analyser)
    with pytest.raises(FaceError, match="not ArcFace-compatible"):
        require_arcface(face, "InstantID")
    with pytest.raises(FaceError, match="128"):
        require_arcface(face.embedding, "IP-Adapter FaceID")


def test_several_faces_largest_first_and_face_index(default_analyser, astronaut_path, hopper_path):
    astronaut = Image.open(astronaut_path).convert("RGB")
    hopper = Image.open(hopper_path).convert("RGB").resize((150, 176))
    canvas = Image.new("RGB", (420, 256), (128, 128, 128))
    canvas.paste(astronaut, (0, 0))  # face ~47 px wide
    canvas.paste(hopper, (265, 40))  # face ~56 px wide: the largest
    faces = default_analyser.detect(canvas)
    assert len(faces) == 2
    assert faces[0].area > faces[1].area and faces[0].bbox[0] > 256
    with pytest.raises(SeveralFacesError, match=r"2 faces found.*--face-index 0 for the largest.*crop"):
        analyse_reference(canvas, default_analyser)  # no index: the photo must show one face
    assert analyse_reference(canvas, default_analyser, face_index=0).bbox[0] > 256
    assert analyse_reference(canvas, default_analyser, face_index=1).bbox[0] < 256
    with pytest.raises(NoFaceError, match=r"face index 2 requested but 2 face\(s\) found"):
        analyse_reference(canvas, default_analyser, face_index=2)


def test_embed_false_skips_the_recogniser(default_analyser, astronaut_path):
    face = default_analyser.detect(astronaut_path, embed=False)[0]
    assert face.embedding is None and face.embedding_kind is None
    with pytest.raises(FaceError, match="no embedding"):
        require_arcface(face, "InstantID")


@pytest.mark.parametrize("kind", ["grayscale", "rgba", "16-bit", "16-bit-array", "exif-rotated"])
def test_awkward_files_give_the_same_face(default_analyser, astronaut_path, tmp_path, kind):
    upright = analyse_reference(astronaut_path, default_analyser)
    image = Image.open(astronaut_path).convert("RGB")
    source = tmp_path / f"{kind}.png"
    if kind == "grayscale":
        image.convert("L").save(source)
    elif kind == "rgba":
        rgba = image.convert("RGBA")
        rgba.paste((0, 0, 0, 0), (0, 200, 256, 256))  # transparent strip away from the face
        rgba.save(source)
    elif kind == "16-bit":
        gray16 = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray16).save(source)
        assert Image.open(source).mode.startswith("I")
    elif kind == "16-bit-array":  # e.g. from cv2.imread(..., IMREAD_UNCHANGED), converted to RGB
        source = np.asarray(image, dtype=np.uint16) * 257
    else:
        # Stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise to view"), as phones do.
        source = tmp_path / "rotated.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(source, exif=exif, quality=95)
    face = analyse_reference(source, default_analyser)
    assert np.abs(face.kps - upright.kps).max() < 3.0


def test_corrupt_truncated_and_huge_files(default_analyser, astronaut_path, tmp_path, monkeypatch):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(astronaut_path.read_bytes()[:4000])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        analyse_reference(truncated, default_analyser)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG but not really")
    with pytest.raises(ImageError, match="garbage.png"):
        analyse_reference(garbage, default_analyser)
    monkeypatch.setattr(images, "MAX_PIXELS", 256 * 255)
    with pytest.raises(ImageError, match="over the limit"):
        analyse_reference(astronaut_path, default_analyser)


def test_mesh_model_override_is_checked(default_analyser, monkeypatch, tmp_path):
    from idcraft.faces.mediapipe_mesh import FaceMesh, find_mesh_model

    monkeypatch.setenv("IDCRAFT_FACE_MESH_MODEL", str(tmp_path / "missing.tflite"))
    with pytest.raises(FaceError, match="missing.tflite: no such file"):
        find_mesh_model()
    other_model = default_analyser.mesh.model_path.with_name("face_detection_short_range.tflite")
    if other_model.is_file():  # a real tflite model, but not the face mesh
        with pytest.raises(FaceError, match="not MediaPipe's face-mesh model"):
            FaceMesh(other_model)
