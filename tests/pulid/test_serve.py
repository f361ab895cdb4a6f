"""PuLID's stage inputs over HTTP (face_embeddings, aligned_faces, face_parsings): the same image as the
engine and `idcraft generate` from the same files, uploads usable by id, each item checked with a 400
naming it, and the inputs part of the identity-cache key."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("httpx", reason="the serve tests need httpx")

from ..serve.conftest import make_config, pixels  # noqa: E402
from .test_engine import ARGS, CASE, expected, load  # noqa: E402

SETTINGS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "scale", "num_zero", "ortho", "sampler")


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from idcraft.serve.app import create_app
    from idcraft.serve.catalog import Catalog, Served

    catalog = Catalog([Served("pulid", load(), "cpu")])
    with TestClient(create_app(make_config(), catalog)) as test_client:
        yield test_client


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def body(name: str, **changes) -> dict:
    args = ARGS[name]
    faces = range(args["faces"])
    return {
        **{k: args[k] for k in SETTINGS},
        "method": "pulid",
        "size": f"{args['width']}x{args['height']}",
        "face_embeddings": [b64(CASE / f"embedding_{i}.npy") for i in faces],
        "aligned_faces": [b64(CASE / f"aligned_{i}.png") for i in faces],
        "face_parsings": [b64(CASE / f"parsing_{i}.png") for i in faces],
        **changes,
    }


def image(answer: dict) -> np.ndarray:
    return pixels(answer["data"][0]["b64_json"]).astype(np.int16)


@pytest.mark.parametrize("name", ["v2", "two_faces"])
def test_stage_inputs_give_the_engine_image(client, name):
    response = client.post("/v1/images/generations", json=body(name))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["cache"] == "miss"
    assert np.abs(image(answer) - expected(name)).max() <= 2


def test_embedding_as_numbers_and_uploads_by_id_hit_the_cache(client):
    first = client.post("/v1/images/generations", json=body("sde"))
    assert first.status_code == 200, first.text
    ids = {}
    for kind in ("aligned", "parsing"):
        upload = client.post("/v1/references", json={"image": b64(CASE / f"{kind}_0.png")})
        assert upload.status_code == 200, upload.text
        ids[kind] = upload.json()["id"]
    numbers = np.load(CASE / "embedding_0.npy").astype(float).tolist()
    again = body(
        "sde", face_embeddings=[numbers], aligned_faces=[ids["aligned"]], face_parsings=[ids["parsing"]]
    )
    second = client.post("/v1/images/generations", json=again)
    assert second.status_code == 200, second.text
    assert second.json()["cache"] == "hit"  # the same content, however it was sent
    np.testing.assert_array_equal(image(second.json()), image(first.json()))
    np.testing.assert_array_less(np.abs(image(first.json()) - expected("sde")), 3)


def test_a_different_aligned_face_is_a_different_identity(client):
    one = client.post("/v1/images/generations", json=body("v1")).json()
    other = body("v1", aligned_faces=[b64(CASE / "aligned_1.png")])
    two = client.post("/v1/images/generations", json=other).json()
    assert two["cache"] == "miss" and not np.array_equal(image(one), image(two))


def _png(size: tuple[int, int], mode: str = "RGB") -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"face_embeddings": [[0.5] * 128]}, "face_embeddings[0]: an embedding has 512 values"),
        ({"face_embeddings": ["bm90IG5weQ=="]}, "face_embeddings[0]: expected a JSON list of 512 numbers"),
        ({"aligned_faces": [_png((256, 256))]}, "aligned_faces[0] must be a 512x512 RGB face"),
        ({"face_parsings": [_png((512, 256), "L")]}, "face_parsings[0] must be a 512x512 map"),
        ({"aligned_faces": ["0" * 64]}, "aligned_faces[0]: no such reference"),
    ],
)
def test_each_item_is_checked_and_named(client, changes, words):
    response = client.post("/v1/images/generations", json=body("v2", steps=1) | changes)
    assert response.status_code in (400, 404), response.text
    assert words in response.json()["error"]["message"]


def test_counts_and_models_list(client):
    two = body("two_faces")
    response = client.post("/v1/images/generations", json=two | {"face_parsings": two["face_parsings"][:1]})
    assert response.status_code == 400 and "1 face_parsings given for 2 faces" in response.text
    options = client.get("/v1/models").json()["data"][0]["options"]
    assert {"face_embeddings", "aligned_faces", "face_parsings"} <= set(options)
