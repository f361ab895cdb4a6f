"""InfiniteYou behind ``idcraft serve``: a reference photo is analysed (the world's face backend finds the
face; the facexlib-layout ArcFace embeds it) once, and a second prompt on it is an identity-cache hit."""

from __future__ import annotations

import base64
import io

import pytest
import torch

pytest.importorskip("fastapi", reason="idcraft serve needs the serve extra")
pytest.importorskip("httpx", reason="the serve tests need httpx")


@pytest.fixture
def client(iyou_engine, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from idcraft.engine import Engine
    from idcraft.infiniteyou.recognition import WEIGHTS_FILE, ArcFaceIRSE
    from idcraft.serve.app import create_app
    from idcraft.serve.catalog import Catalog, Served
    from idcraft.serve.config import ServeConfig
    from idcraft.world import bundle

    torch.manual_seed(0)
    torch.save(ArcFaceIRSE().eval().state_dict(), tmp_path / WEIGHTS_FILE)
    monkeypatch.setenv("IDCRAFT_ARCFACE", str(tmp_path))  # the world backend's --face-models is its own
    monkeypatch.delenv("IDCRAFT_API_TOKEN", raising=False)
    engine = Engine(
        {"infiniteyou": iyou_engine.pipeline()},
        face_backend="world",
        face_models=bundle.bundle_path(bundle.IDENTITY),
    )
    catalog = Catalog([Served("infiniteyou", engine, "cpu", {"steps": 2, "width": 64, "height": 64})])
    app = create_app(ServeConfig(), catalog)
    with TestClient(app) as test_client:
        yield test_client


def _reference() -> str:
    from idcraft.world.generate import reference_image
    from idcraft.world.identity import held_out_ids

    buffer = io.BytesIO()
    reference_image(held_out_ids()[0]).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_second_prompt_is_a_cache_hit(client):
    reference = _reference()

    def generate(**extra):
        body = {"prompt": "a portrait photo", "references": [reference], "seed": 1, **extra}
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    first = generate()
    assert first["cache"] == "miss"
    again = generate(prompt="a cat portrait", infusenet_start=0.5)
    assert again["cache"] == "hit" and again["timings"]["encode_s"] == 0.0
    model = client.get("/v1/models").json()["data"][0]
    assert model["id"] == "infiniteyou" and "infusenet_start" in model["options"]
