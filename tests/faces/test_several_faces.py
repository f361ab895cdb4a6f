"""A reference photo with several faces and no face index is refused, naming the photo, the count and the
fix, by every face family through the one shared selection (FaceID-Plus and InstantID keypoints, PuLID),
on the command line (one line, exit 2) and over HTTP (422); an explicit index, 0 included, picks a face."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idcraft.engine import Engine
from idcraft.faces import SeveralFacesError
from idcraft.requests import GenerationRequest

PULID = Path(__file__).resolve().parents[1] / "fixtures" / "pulid-sdxl"
SETTINGS = dict(steps=2, width=64, height=64, seed=1)


@pytest.fixture(scope="module")
def group_photo(tmp_path_factory, default_analyser, astronaut_path, hopper_path) -> Path:
    """Two real faces side by side (the default backend finds both), saved so errors can name the file."""
    canvas = Image.new("RGB", (420, 256), (128, 128, 128))
    canvas.paste(Image.open(astronaut_path).convert("RGB"), (0, 0))
    canvas.paste(Image.open(hopper_path).convert("RGB").resize((150, 176)), (265, 40))
    path = tmp_path_factory.mktemp("group") / "group.png"
    canvas.save(path)
    assert len(default_analyser.detect(path, embed=False)) == 2
    return path


def _embedding() -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(512) * 20).astype(np.float32)


def _refused(call, path: Path) -> None:
    with pytest.raises(SeveralFacesError) as caught:
        call()
    message = str(caught.value)
    assert message.startswith(f"{path}: 2 faces found"), message
    assert "--face-index 0 for the largest, 1 for the next" in message and "crop the photo" in message


def test_faceid_plus_keypoints_from_a_group_photo(group_photo):
    from idcraft.encoders import ClipImageEncoder
    from idcraft.pipeline import IPAdapterPipeline
    from idcraft.tiny import random_adapter, tiny_image_encoder, tiny_sd15_pipeline

    base, encoder = tiny_sd15_pipeline(), ClipImageEncoder(tiny_image_encoder())
    pipe = IPAdapterPipeline(base, random_adapter(base.unet, "faceid-plusv2", encoder.model), encoder)
    engine = Engine({"faceid-plusv2": pipe}, face_backend="default")
    request = GenerationRequest(
        "a portrait", references=[str(group_photo)], face_embeddings=[_embedding()], **SETTINGS
    )
    _refused(lambda: engine.generate(request), group_photo)
    for index in (0, 1):  # an explicit index keeps the largest-first choice
        result = engine.generate(replace(request, face_index=index))
        assert result.images[0].size == (64, 64)


def test_instantid_keypoints_from_a_group_photo(group_photo):
    from idcraft.pipeline import IPAdapterPipeline
    from idcraft.tiny import random_adapter, tiny_controlnet, tiny_sdxl_pipeline

    base = tiny_sdxl_pipeline()
    pipe = IPAdapterPipeline(
        base, random_adapter(base.unet, "instantid"), controlnet=tiny_controlnet(base.unet)
    )
    engine = Engine({"instantid": pipe}, face_backend="default")
    request = GenerationRequest("a portrait", references=[str(group_photo)], face_embeddings=[_embedding()])
    _refused(lambda: engine.encode(request), group_photo)
    assert engine.encode(replace(request, face_index=0)).method == "instantid"


@pytest.fixture(scope="module")
def pulid_engine(default_analyser) -> Engine:
    return Engine.from_pretrained(
        PULID / "base",
        PULID / "pulid_tiny.safetensors",
        eva_clip=PULID / "eva_tiny.pt",
        device="cpu",
        dtype="float32",
        face_backend="default",
    )


def _pulid_request(photo: Path, **changes) -> GenerationRequest:
    """The fixture's face 0 embedding and label map; the aligned face comes from detection in ``photo``."""
    from idcraft.pulid.preprocess import read_label_map

    return GenerationRequest(
        "a portrait photo of a person",
        references=[str(photo)],
        face_embeddings=[np.load(PULID / "embedding_0.npy")],
        face_parsings=[read_label_map(PULID / "parsing_0.png")],
        steps=2,
        width=64,
        height=48,
        seed=3,
        **changes,
    )


def test_pulid_detection_from_a_group_photo(pulid_engine, group_photo):
    _refused(lambda: pulid_engine.generate(_pulid_request(group_photo)), group_photo)
    result = pulid_engine.generate(_pulid_request(group_photo, face_index=0))
    assert result.images[0].size == (64, 48)


def test_cli_one_line_error(group_photo, tmp_path, capsys):
    from idcraft.cli import main

    args = [
        "generate", "--method", "pulid", "--prompt", "a portrait", "--reference", str(group_photo),
        "--face-embedding", str(PULID / "embedding_0.npy"), "--face-parsing", str(PULID / "parsing_0.png"),
        "--face-backend", "default", "--steps", "2", "--width", "64", "--height", "48",
        "--base", str(PULID / "base"), "--adapter", str(PULID / "pulid_tiny.safetensors"),
        "--eva-clip", str(PULID / "eva_tiny.pt"), "--device", "cpu", "--dtype", "float32",
    ]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "no.png")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # not progress bars
    assert len(errors) == 1 and errors[0].startswith(f"idcraft generate: error: {group_photo}: 2 faces found")
    assert "--face-index 0 for the largest" in errors[0]
    assert not (tmp_path / "no.png").exists()
    assert main([*args, "--face-index", "1", "--output", str(tmp_path / "yes.png")]) == 0
    assert Image.open(tmp_path / "yes.png").size == (64, 48)


def test_http_422_names_the_fix(pulid_engine, group_photo):
    pytest.importorskip("httpx", reason="the serve tests need httpx")
    from fastapi.testclient import TestClient

    from idcraft.serve.app import create_app
    from idcraft.serve.catalog import Catalog, Served

    from ..serve.conftest import make_config

    catalog = Catalog([Served("pulid", pulid_engine, "cpu")])
    body = {
        "prompt": "a portrait",
        "references": [base64.b64encode(group_photo.read_bytes()).decode("ascii")],
        "size": "64x48",
        "steps": 2,
    }
    with TestClient(create_app(make_config(), catalog)) as client:
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["type"] == "several_faces"
        assert "2 faces found" in error["message"] and "face_index 0 for the largest" in error["message"]
