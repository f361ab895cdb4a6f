"""Every endpoint of ``idcraft serve`` on the offline world, and the answers to bad input."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np
from PIL import Image

from .conftest import STEPS, pixels, png_b64, png_bytes


def generate(client, **body):
    body.setdefault("prompt", "a portrait in a garden")
    body.setdefault("steps", STEPS)
    return client.post("/v1/images/generations", json=body)


def error_of(response, status: int, kind: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type"}
    if kind is not None:
        assert error["type"] == kind, error
    assert "Traceback" not in error["message"]
    return error["message"]


def test_health_models_examples_page(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["world"] is True
    assert health["methods"] == ["ip-adapter", "ip-adapter-plus", "faceid", "instantid", "none"]

    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == health["methods"]
    first = models[0]
    assert first["defaults"] == {"steps": 20, "guidance": 5.0, "scale": 1.0, "width": 64, "height": 64}
    assert {m["id"]: m["needs_face"] for m in models}["instantid"] is True
    assert "keypoints" in {m["id"]: m for m in models}["instantid"]["options"]

    examples = client.get("/v1/examples").json()["data"]
    assert len(examples) == 4 and all(len(e["id"]) == 64 for e in examples)
    assert Image.open(__import__("io").BytesIO(base64.b64decode(examples[0]["b64_json"]))).size == (64, 64)

    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text and "http" not in page.text.split("<body>")[1].replace(
        "http-equiv", ""
    )
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "/v1/images/generations" in script.text


def test_generation_openai_shape_and_idcraft_fields(client, references):
    response = generate(
        client, references=[references[0]], seed=7, n=2, size="64x64", scale=0.8, guidance=4.0
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= {"created", "data", "seed", "method", "timings", "warnings", "cache"}
    assert body["seed"] == 7 and body["method"] == "ip-adapter" and body["cache"] == "miss"
    assert len(body["data"]) == 2 and pixels(body["data"][0]["b64_json"]).shape == (64, 64, 3)
    assert set(body["timings"]) == {"queue_s", "encode_s", "generate_s", "total_s"}
    assert body["settings"]["steps"] == STEPS and body["settings"]["scale"] == 0.8
    # the same request gives the same images (the seed is the whole randomness)
    again = generate(client, references=[references[0]], seed=7, n=2, size="64x64", scale=0.8, guidance=4.0)
    assert again.json()["cache"] == "hit"
    assert np.array_equal(pixels(again.json()["data"][1]["b64_json"]), pixels(body["data"][1]["b64_json"]))
    # no seed: a random one, reported
    random = generate(client, references=[references[0]]).json()
    assert isinstance(random["seed"], int)
    # OpenAI's ``model`` names the method when ``method`` is left out
    assert (
        generate(client, model="ip-adapter-plus", references=[references[0]]).json()["method"]
        == "ip-adapter-plus"
    )


def test_face_methods_and_keypoints(client, references):
    faceid = generate(client, method="faceid", references=[references[1]], seed=1)
    assert faceid.status_code == 200, faceid.text
    keypoints = [[22, 26], [42, 26], [32, 36], [24, 46], [40, 46]]
    instantid = generate(client, method="instantid", references=[references[1]], seed=1, keypoints=keypoints)
    assert "width (from size)" in error_of(instantid, 400)
    instantid = generate(
        client, method="instantid", references=[references[1]], seed=1, keypoints=keypoints, size="64x64"
    )
    assert instantid.status_code == 200, instantid.text
    assert instantid.json()["size"] == "64x64"


def test_references_upload_json_and_multipart(client, references):
    uploaded = client.post("/v1/references", json={"image": "data:image/png;base64," + references[2]})
    assert uploaded.status_code == 200, uploaded.text
    ref = uploaded.json()
    assert ref["width"] == 64 and ref["bytes"] == len(base64.b64decode(references[2]))
    raw = base64.b64decode(references[2])
    multipart = client.post("/v1/references", files={"file": ("ref.png", raw, "image/png")}).json()
    assert multipart["id"] == ref["id"]  # the id is the content hash
    first = generate(client, references=[ref["id"]], seed=2)
    assert first.status_code == 200 and first.json()["cache"] == "miss"
    # inline bytes of the same file hit the cache made from the id
    inline = generate(client, references=[references[2]], seed=2, prompt="a portrait at the beach")
    assert inline.json()["cache"] == "hit"
    upper = generate(client, references=[ref["id"].upper()], seed=2)  # ids are read in either case
    assert upper.status_code == 200 and upper.json()["cache"] == "hit"


def test_bad_input_is_a_4xx_with_a_message(client, references):
    ref = [references[0]]
    assert "unknown method" in error_of(
        generate(client, method="nope", references=ref), 400, "invalid_request"
    )
    assert "multiple of 8" in error_of(generate(client, references=ref, size="60x64"), 400)
    assert "WIDTHxHEIGHT" in error_of(generate(client, references=ref, size="big"), 400)
    assert "b64_json" in error_of(generate(client, references=ref, response_format="url"), 400)
    assert "unknown field" in error_of(generate(client, references=ref, guidence=3), 400)
    assert "multi_person: not used by ip-adapter" in error_of(
        generate(client, references=ref, multi_person=True), 400
    )
    assert "steps" in error_of(generate(client, references=ref, steps=0), 400)
    assert "over the limit" in error_of(generate(client, references=ref, n=1000), 400)
    nan = client.post(
        "/v1/images/generations",
        content=b'{"prompt": "x", "scale": NaN, "method": "ip-adapter", "references": []}',
        headers={"content-type": "application/json"},
    )
    assert "finite" in error_of(nan, 400)
    broken = client.post(
        "/v1/images/generations", content=b'{"prompt": ', headers={"content-type": "application/json"}
    )
    assert "JSON" in error_of(broken, 400)
    assert "needs at least one reference" in error_of(generate(client, method="ip-adapter"), 400)
    assert "needs at least one reference" in error_of(generate(client, method="faceid", references=[]), 400)
    assert "not valid base64" in error_of(generate(client, references=["%%%"]), 400)
    for unknown in ("0" * 64, "AB" * 32, "abc123", "ref_1"):  # unknown, upper-case, short: never base64
        message = error_of(generate(client, references=[unknown]), 404, "not_found")
        assert f"no such reference {unknown.lower()!r}" in message
    not_utf8 = client.post(
        "/v1/images/generations",
        content=b'{"prompt": "caf\xe9"}',
        headers={"content-type": "application/json"},
    )
    assert "not valid UTF-8 (byte 0xe9 at position 15)" in error_of(not_utf8, 400)
    nested = client.post(
        "/v1/images/generations", content=b"[" * 100_000, headers={"content-type": "application/json"}
    )
    assert "nested too deeply" in error_of(nested, 400)
    assert error_of(client.get("/v1/nothing"), 404)


def test_bad_images(client):
    not_image = base64.b64encode(b"hello, not an image").decode()
    assert "not an image" in error_of(generate(client, references=[not_image]), 400, "invalid_image")
    whole = png_bytes(Image.new("RGB", (64, 64), (200, 40, 40)))
    truncated = base64.b64encode(whole[: len(whole) // 2]).decode()
    error_of(generate(client, references=[truncated]), 400, "invalid_image")
    error_of(client.post("/v1/references", json={"image": truncated}), 400, "invalid_image")
    # a decompression bomb: a small file that declares 100000 x 100000 pixels
    assert "limit" in error_of(
        generate(client, references=[base64.b64encode(bomb()).decode()]), 413, "too_large"
    )
    error_of(client.post("/v1/references", files={"file": ("bomb.png", bomb(), "image/png")}), 413)
    # a face method given a picture without a world character
    red = png_b64(Image.new("RGB", (64, 64), (200, 40, 40)))
    assert "no face" in error_of(generate(client, method="faceid", references=[red]), 422, "no_face")


def test_metrics_count_requests_cache_and_errors(client, references):
    generate(client, references=[references[0]], seed=1)
    generate(client, references=[references[0]], seed=2)
    generate(client, method="nope", references=[references[0]])
    text = client.get("/metrics").text
    assert "idcraft_identity_cache_hits_total 1" in text
    assert "idcraft_identity_cache_misses_total 1" in text
    assert "idcraft_encode_calls_total 1" in text
    assert 'idcraft_requests_total{endpoint="/v1/images/generations",status="200"} 2' in text
    assert 'idcraft_errors_total{type="invalid_request",status="400"} 1' in text
    assert "idcraft_queue_depth 0" in text and "idcraft_in_flight 0" in text
    assert 'idcraft_generation_seconds_bucket{le="+Inf"} 2' in text
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` (CRC fixed)."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    ihdr = 8  # the IHDR chunk: length (4), type (4), width, height, ...
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 8 + 13]))
    data[ihdr + 8 + 13 : ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)
