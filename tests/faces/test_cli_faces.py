"""``idcraft faces``: listing, JSON lines, saved embeddings, annotations, exit statuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from idcraft.cli import main

from .tiny_onnx import white_cell_image


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_and_exit_status_1_for_a_photo_without_face(
    default_analyser, astronaut_path, gradient_path, hopper_path, capsys
):
    status = main(["faces", "--json", str(astronaut_path), str(gradient_path), str(hopper_path)])
    captured = capsys.readouterr()
    assert status == 1  # the gradient has no face ...
    records = json_lines(captured.out)
    assert [r["image"] for r in records] == [str(astronaut_path), str(gradient_path), str(hopper_path)]
    assert all(r["backend"] == "default" for r in records)  # ... and the other images were still processed
    astronaut, gradient, hopper = records
    assert len(astronaut["faces"]) == 1 and len(hopper["faces"]) == 1
    assert set(astronaut["faces"][0]) == {"bbox", "score", "kps"}
    assert len(astronaut["faces"][0]["bbox"]) == 4 and np.array(astronaut["faces"][0]["kps"]).shape == (5, 2)
    assert gradient["faces"] == [] and "no face found" in gradient["error"]
    assert "no face found" in captured.err


def test_human_listing(default_analyser, astronaut_path, capsys):
    assert main(["faces", str(astronaut_path)]) == 0
    out = capsys.readouterr().out
    assert "NOT ArcFace-compatible" in out
    assert f"{astronaut_path}: 1 face(s)" in out and "[0] box (" in out and "kps (" in out


def test_saves_embeddings_and_annotations(default_analyser, astronaut_path, hopper_path, tmp_path, capsys):
    embeddings, annotated = tmp_path / "emb", tmp_path / "ann"
    status = main(
        [
            "faces",
            str(astronaut_path),
            str(hopper_path),
            "--save-embeddings",
            str(embeddings),
            "--annotate",
            str(annotated),
        ]
    )
    assert status == 0
    vector = np.load(embeddings / "astronaut.npy")
    assert vector.shape == (128,) and vector.dtype == np.float32
    note = json.loads((embeddings / "astronaut.json").read_text())
    assert note["embedding_kind"] == "dlib-resnet" and note["is_arcface"] is False and note["face_index"] == 0
    assert (embeddings / "grace_hopper.npy").exists()
    drawn = np.asarray(Image.open(annotated / "astronaut.png").convert("RGB")).astype(int)
    original = np.asarray(Image.open(astronaut_path).convert("RGB")).astype(int)
    assert drawn.shape == original.shape and (np.abs(drawn - original).sum(axis=2) > 100).sum() > 50


def test_face_index_out_of_range_is_an_error_for_that_image(
    default_analyser, astronaut_path, tmp_path, capsys
):
    status = main(["faces", str(astronaut_path), "--face-index", "1", "--save-embeddings", str(tmp_path)])
    assert status == 1
    assert "face index 1 requested but 1 face(s) found" in capsys.readouterr().err
    assert not (tmp_path / "astronaut.npy").exists()


def test_unreadable_image_is_reported_and_others_processed(
    default_analyser, astronaut_path, tmp_path, capsys
):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    status = main(["faces", "--json", str(broken), str(astronaut_path)])
    records = json_lines(capsys.readouterr().out)
    assert status == 1
    assert "error" in records[0] and records[0]["faces"] == []
    assert len(records[1]["faces"]) == 1


def test_insightface_backend_on_a_tiny_pack(antelope_pack, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.fromarray(white_cell_image(800, 400, (200, 120, 240, 160))).save(photo)
    status = main(
        [
            "faces",
            "--backend",
            "insightface",
            "--models",
            str(antelope_pack),
            "--providers",
            "cuda,cpu",
            "--json",
            "--save-embeddings",
            str(tmp_path / "emb"),
            str(photo),
        ]
    )
    captured = capsys.readouterr()
    assert status == 0
    (record,) = json_lines(captured.out)
    assert record["backend"] == "insightface:antelopev2"
    np.testing.assert_allclose(record["faces"][0]["bbox"], [160, 60, 280, 220], atol=0.01)
    assert np.load(tmp_path / "emb" / "photo.npy").shape == (512,)
    assert json.loads((tmp_path / "emb" / "photo.json").read_text())["is_arcface"] is True
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "warning: onnxruntime execution provider(s) CUDAExecutionProvider requested" in captured.err


def test_missing_pack_is_a_fatal_error(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("IDCRAFT_INSIGHTFACE_HOME", raising=False)
    assert main(["faces", "--backend", "insightface", "whatever.png"]) == 2
    assert "no insightface model pack found" in capsys.readouterr().err


def test_insightface_options_need_that_backend(capsys):
    assert main(["faces", "--models", "somewhere", "x.png"]) == 2
    assert "--backend insightface" in capsys.readouterr().err
