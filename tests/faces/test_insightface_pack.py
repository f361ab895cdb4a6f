"""The insightface-pack backend on tiny ONNX models with the real models' signatures.

The detector fires where its input is white, so a test chooses where "the face" is and knows exactly which
anchor fires and what box and keypoints a correct decoder (anchor centres, strides, letterbox scale, NMS)
must report.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from idcraft.errors import FaceError
from idcraft.faces import ARCFACE, analyse_reference, get_face_analyser, require_arcface
from idcraft.faces.insightface_pack import find_model_pack
from idcraft.faces.onnx_runtime import CPU, CUDA, ProviderWarning

from .tiny_onnx import build_arcface, build_scrfd, face_like_kps_dist, white_cell_image

pytestmark = pytest.mark.usefixtures("onnx_tools")

# An 800x400 photo letterboxes into 640x320 (det_scale 0.8). The white square covers exactly detector cell
# (row 3, column 5) at stride 32, i.e. detector pixels x 160..192, y 96..128 -> image x 200..240, y 120..160.
PHOTO_W, PHOTO_H, DET_SCALE = 800, 400, 0.8
ANCHOR = np.array([5 * 32, 3 * 32], dtype=np.float64)  # SCRFD anchor centres are cell corners, x*stride
WHITE = (200, 120, 240, 160)


def expected_box(dist, anchor=ANCHOR, stride=32, scale=DET_SCALE):
    left, top, right, bottom = np.asarray(dist) * stride
    return np.array([anchor[0] - left, anchor[1] - top, anchor[0] + right, anchor[1] + bottom]) / scale


def expected_kps(dist, anchor=ANCHOR, stride=32, scale=DET_SCALE):
    return (anchor + np.asarray(dist).reshape(5, 2) * stride) / scale


def pack_with(tmp_path, name="antelopev2", **scrfd_kwargs):
    folder = tmp_path / name
    build_scrfd(folder / "scrfd_10g_bnkps.onnx", **scrfd_kwargs)
    return folder


def test_decodes_a_known_box_and_keypoints(antelope_pack):
    analyser = get_face_analyser("insightface", models_dir=antelope_pack, providers=["cpu"])
    faces = analyser.detect(white_cell_image(PHOTO_W, PHOTO_H, WHITE))
    assert len(faces) == 1
    face = faces[0]
    np.testing.assert_allclose(face.bbox, expected_box([1.0, 1.5, 2.0, 2.5]), atol=1e-3)
    np.testing.assert_allclose(face.kps, expected_kps(face_like_kps_dist()[0]), atol=1e-3)
    assert face.score > 0.99
    assert face.backend == "insightface:antelopev2"
    assert face.embedding_kind == ARCFACE and face.is_arcface
    assert face.embedding_model == "glintr100.onnx" and face.embedding.shape == (512,)


def test_nothing_found_on_black(antelope_pack):
    analyser = get_face_analyser("insightface", models_dir=antelope_pack)
    assert analyser.detect(np.zeros((300, 500, 3), np.uint8)) == []


def test_nms_merges_two_anchors_on_one_face(tmp_path):
    # Both anchors fire on the same cell; anchor 1 scores 0.9 and predicts an overlapping box (IoU > 0.4).
    pack = pack_with(tmp_path, anchor_gain=(1.0, 0.9))
    faces = get_face_analyser("insightface", models_dir=pack).detect(
        white_cell_image(PHOTO_W, PHOTO_H, WHITE)
    )
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].bbox, expected_box([1.0, 1.5, 2.0, 2.5]), atol=1e-3)
    assert faces[0].embedding is None  # the pack has no recogniser: detection only


def test_separate_faces_are_listed_largest_first_not_by_score(tmp_path):
    # Anchor 1 (score 0.9) predicts a separate, larger box; it must come first.
    far_larger = [-3.0, -3.0, 8.0, 8.0]
    pack = pack_with(
        tmp_path, anchor_gain=(1.0, 0.9), box_dist=[[1.0, 1.5, 2.0, 2.5], far_larger], batched=True
    )
    analyser = get_face_analyser("insightface", models_dir=pack)
    assert analyser.detector.batched
    faces = analyser.detect(white_cell_image(PHOTO_W, PHOTO_H, WHITE))
    assert len(faces) == 2
    np.testing.assert_allclose(faces[0].bbox, expected_box(far_larger), atol=1e-3)
    np.testing.assert_allclose(faces[1].bbox, expected_box([1.0, 1.5, 2.0, 2.5]), atol=1e-3)
    assert faces[0].score < faces[1].score and faces[0].area > faces[1].area


def test_retries_at_smaller_detector_sizes(tmp_path):
    # The detector only answers when its input is at most 480 px wide: found at the first retry size.
    pack = pack_with(tmp_path, max_width=480)
    analyser = get_face_analyser("insightface", models_dir=pack)
    assert analyser.det_sizes == (640, 480, 320)
    # At 480 the 800x400 photo scales by 0.6; image x 205..275 covers detector cell column 4 (128..160).
    photo = white_cell_image(PHOTO_W, PHOTO_H, (205, 155, 275, 225))
    faces = analyser.detect(photo)
    assert len(faces) == 1
    anchor = np.array([4 * 32, 3 * 32], dtype=np.float64)  # row 3: detector y 96..128 = image 160..213
    np.testing.assert_allclose(
        faces[0].bbox, expected_box([1.0, 1.5, 2.0, 2.5], anchor, scale=0.6), atol=1e-3
    )


def test_no_face_error_names_file_sizes_and_smallest_face(tmp_path):
    pack = pack_with(tmp_path, fire_stride=None)  # never fires
    path = tmp_path / "empty.png"
    from PIL import Image

    Image.fromarray(white_cell_image(PHOTO_W, PHOTO_H, WHITE)).save(path)
    with pytest.raises(FaceError) as info:
        analyse_reference(path, get_face_analyser("insightface", models_dir=pack))
    message = str(info.value)
    assert str(path) in message and "no face found" in message
    assert "640, 480, 320" in message
    assert "about 16 px there, i.e. about 20 px in this 800x400 image" in message


def test_fixed_size_detector_is_run_at_its_size_only(tmp_path):
    folder = tmp_path / "fixed"
    build_scrfd(folder / "det_10g.onnx", dynamic=False)
    analyser = get_face_analyser("insightface", models_dir=folder)
    assert analyser.detector.fixed_input_size == (640, 640)
    assert analyser.det_sizes == (640,)
    assert len(analyser.detect(white_cell_image(PHOTO_W, PHOTO_H, WHITE))) == 1


def test_arcface_input_is_rgb_normalised_by_127_5(antelope_pack):
    # A uniform colour photo: the aligned crop is that colour, and the tiny recogniser reports the mean of
    # each input channel. RGB order and (x - 127.5) / 127.5 are what insightface gives glintr100.
    analyser = get_face_analyser("insightface", models_dir=antelope_pack)
    photo = np.zeros((600, 600, 3), np.uint8)
    photo[:] = (200, 100, 50)
    kps = np.array([[280, 280], [320, 280], [300, 300], [285, 320], [315, 320]], dtype=np.float32)
    embedding = analyser.recognizer.embed(photo, kps)
    np.testing.assert_allclose(embedding[:3], (np.array([200, 100, 50]) - 127.5) / 127.5, atol=1e-5)
    assert embedding.shape == (512,)


def test_raw_embedding_and_normed_helper(antelope_pack):
    face = analyse_reference(
        white_cell_image(PHOTO_W, PHOTO_H, WHITE), get_face_analyser("insightface", models_dir=antelope_pack)
    )
    raw = require_arcface(face, "InstantID")
    assert raw is face.embedding and abs(np.linalg.norm(raw) - 1.0) > 1e-3  # not normalised
    np.testing.assert_allclose(face.normed_embedding, raw / np.linalg.norm(raw), rtol=1e-6)


def test_nested_pack_folder_is_found(tmp_path, antelope_pack):
    # The antelopev2 zip unpacks to antelopev2/antelopev2/*.onnx.
    outer = tmp_path / "antelopev2"
    shutil.copytree(antelope_pack, outer / "antelopev2")
    assert find_model_pack(outer) == outer / "antelopev2"
    analyser = get_face_analyser("insightface", models_dir=outer)
    assert analyser.recognizer is not None and analyser.name == "insightface:antelopev2"


def test_pack_choice_in_a_folder_of_packs(tmp_path, antelope_pack):
    shutil.copytree(antelope_pack, tmp_path / "antelopev2")
    shutil.copytree(antelope_pack, tmp_path / "buffalo_l" / "buffalo_l")  # nested, and not first by name
    assert find_model_pack(tmp_path) == tmp_path / "antelopev2"
    assert find_model_pack(tmp_path, pack="buffalo_l") == tmp_path / "buffalo_l" / "buffalo_l"


def test_default_location_under_home(tmp_path, monkeypatch, antelope_pack):
    monkeypatch.delenv("IDCRAFT_INSIGHTFACE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FaceError, match=r"\.insightface/models/antelopev2"):
        find_model_pack()
    # buffalo_l, nested one folder too deep, is found when antelopev2 is absent.
    target = tmp_path / ".insightface" / "models" / "buffalo_l" / "buffalo_l"
    target.mkdir(parents=True)
    shutil.copy(antelope_pack / "scrfd_10g_bnkps.onnx", target / "det_10g.onnx")
    shutil.copy(antelope_pack / "glintr100.onnx", target / "w600k_r50.onnx")
    assert find_model_pack() == target
    analyser = get_face_analyser("insightface")
    assert analyser.recognizer.model_name == "w600k_r50.onnx"
    assert analyser.detector.path.name == "det_10g.onnx"


def test_unknown_file_names_are_classified_by_signature(tmp_path, tiny_scrfd, tiny_arcface):
    folder = tmp_path / "custom"
    folder.mkdir()
    shutil.copy(tiny_scrfd, folder / "my_detector.onnx")
    shutil.copy(tiny_arcface, folder / "my_recogniser.onnx")
    analyser = get_face_analyser("insightface", models_dir=folder)
    assert analyser.detector.path.name == "my_detector.onnx"
    assert analyser.recognizer.model_name == "my_recogniser.onnx"


def test_pack_without_detector_is_explained(tmp_path, tiny_arcface):
    folder = tmp_path / "broken"
    folder.mkdir()
    shutil.copy(tiny_arcface, folder / "glintr100.onnx")
    with pytest.raises(FaceError, match="no SCRFD face detector"):
        get_face_analyser("insightface", models_dir=folder)


def test_corrupt_model_file_is_explained(tmp_path):
    folder = tmp_path / "antelopev2"
    folder.mkdir()
    (folder / "scrfd_10g_bnkps.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(FaceError, match="cannot load this ONNX model"):
        get_face_analyser("insightface", models_dir=folder)


def test_missing_folder_is_explained(tmp_path):
    with pytest.raises(FaceError, match="does not exist"):
        get_face_analyser("insightface", models_dir=tmp_path / "nowhere")


def test_session_reports_the_providers_it_runs_on(antelope_pack):
    import onnxruntime

    analyser = get_face_analyser("insightface", models_dir=antelope_pack, providers=["cpu"])
    assert analyser.active_providers == [CPU]
    assert "onnxruntime providers CPUExecutionProvider" in analyser.describe()
    if CUDA not in onnxruntime.get_available_providers():
        with pytest.warns(ProviderWarning, match="CUDAExecutionProvider"):
            analyser = get_face_analyser("insightface", models_dir=antelope_pack, providers=["cuda"])
        assert analyser.active_providers == [CPU]


def test_recogniser_other_seed_gives_other_embedding(tmp_path, antelope_pack):
    # Guards against an embedding that ignores the model: a different recogniser must change it.
    folder = tmp_path / "antelopev2"
    shutil.copytree(antelope_pack, folder)
    build_arcface(folder / "glintr100.onnx", seed=1)
    photo = white_cell_image(PHOTO_W, PHOTO_H, WHITE)
    a = analyse_reference(photo, get_face_analyser("insightface", models_dir=antelope_pack))
    b = analyse_reference(photo, get_face_analyser("insightface", models_dir=folder))
    np.testing.assert_allclose(a.embedding[:3], b.embedding[:3], atol=1e-6)  # same input crop
    assert not np.allclose(a.embedding[3:], b.embedding[3:])
