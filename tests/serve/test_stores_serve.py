"""The server on a shared store: a restart loses no uploaded reference and no encoding, two server
processes on one Redis share both (an upload to one serves on the other, whose first generation is a
cache hit with no encoder call), and a store that fails while serving costs the cache, never an answer
that could be given."""

from __future__ import annotations

import logging
import signal

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from .conftest import STEPS, pixels, png_b64
from .processes import serve_process
from .redis_server import redis_server


@pytest.fixture
def encoder_calls(world, monkeypatch):
    """Calls of the in-process world's image encoder / face analysis, all methods together."""
    calls = [0]
    for method in world.methods:
        pipe = world.pipeline(method)

        def counting(*args, _real=pipe.encode_references, **kwargs):
            calls[0] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(pipe, "encode_references", counting)
    return calls


@pytest.fixture(scope="module")
def portraits():
    """Base64 PNGs of world portraits that are not among the examples the server pins (mirrored), so an
    upload of them lives in the store alone."""
    from PIL import ImageOps

    from idcraft.world.generate import reference_image
    from idcraft.world.identity import held_out_ids

    return [png_b64(ImageOps.mirror(reference_image(i))) for i in held_out_ids()[:3]]


@pytest.fixture
def redis(tmp_path):
    with redis_server(tmp_path) as server:
        yield server


def upload(http, image_b64: str) -> str:
    answer = http.post("/v1/references", json={"image": image_b64})
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def generate(http, reference: str, seed: int = 3, expect: int = 200) -> dict:
    body = {"prompt": "a portrait", "references": [reference], "steps": STEPS, "seed": seed}
    answer = http.post("/v1/images/generations", json=body)
    assert answer.status_code == expect, answer.text
    return answer.json() | {"_headers": dict(answer.headers)}


def metric(text: str, line_start: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(line_start)).split()[-1])


@pytest.mark.parametrize("kind", ["folder", "redis"])
def test_a_restart_keeps_uploads_and_encodings(kind, make_app, portraits, encoder_calls, tmp_path, request):
    store = str(tmp_path / "store") if kind == "folder" else request.getfixturevalue("redis").url
    app, _ = make_app(store=store)
    with TestClient(app) as http:
        reference = upload(http, portraits[0])
        first = generate(http, reference)
        assert first["cache"] == "miss" and encoder_calls[0] == 1
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["store"]["kind"] == kind
    restarted, _ = make_app(store=store)  # a new server: its memory starts empty, the store does not
    with TestClient(restarted) as http:
        again = generate(http, reference)
        metrics = http.get("/metrics").text
    assert again["cache"] == "hit" and again["timings"]["encode_s"] == 0.0
    assert encoder_calls[0] == 1  # the first server's encoding, read back: no encoder call
    assert np.array_equal(pixels(again["data"][0]["b64_json"]), pixels(first["data"][0]["b64_json"]))
    assert metric(metrics, "idcraft_identity_cache_shared_hits_total") == 1


def test_with_the_memory_store_a_restart_forgets_uploads(make_app, portraits):
    app, _ = make_app()
    with TestClient(app) as http:
        reference = upload(http, portraits[0])
        assert http.get("/readyz").json()["store"] == {
            "kind": "memory",
            "location": "memory",
            "reachable": True,
        }
    restarted, _ = make_app()
    with TestClient(restarted) as http:
        answer = generate(http, reference, expect=404)
    assert "kept in memory" in answer["error"]["message"]


def test_two_server_processes_on_one_redis_share_references_and_encodings(
    redis, make_app, portraits, encoder_calls
):
    with serve_process("--store", redis.url, threads=1) as other:
        other.wait_ready("/readyz")
        with httpx.Client(base_url=other.url, timeout=120) as there:
            reference = upload(there, portraits[1])
            first = generate(there, reference, seed=5)
        assert first["cache"] == "miss"
        app, _ = make_app(store=redis.url)
        with TestClient(app) as here:  # this process never saw the upload nor encoded it
            shared = generate(here, reference, seed=5)
        assert shared["cache"] == "hit" and encoder_calls[0] == 0
        # the same conditioning and seed; another process's CPU kernels may differ in the last bits
        difference = np.abs(
            pixels(shared["data"][0]["b64_json"]).astype(int) - pixels(first["data"][0]["b64_json"])
        )
        assert difference.mean() < 1.0, difference.mean()
        other.process.send_signal(signal.SIGTERM)
        assert other.process.wait(60) in (0, -signal.SIGTERM)


def test_a_store_failing_while_serving_degrades_to_no_cache(
    redis, make_app, portraits, encoder_calls, caplog
):
    app, _ = make_app(store=redis.url, store_retry_s=30)
    with TestClient(app) as http:
        reference = upload(http, portraits[0])
        assert generate(http, reference)["cache"] == "miss"
        redis.stop()
        with caplog.at_level(logging.WARNING, logger="idcraft.serve"):
            inline = generate(http, portraits[2])  # servable without the store: served, uncached
            assert inline["cache"] == "miss"
            assert generate(http, portraits[2])["cache"] == "hit"  # the hot tier in memory still works
        assert any("identity cache store" in r.getMessage() for r in caplog.records)
        by_id = generate(http, reference, expect=503)  # its bytes are in the store alone
        assert "reference store" in by_id["error"]["message"] and by_id["_headers"]["retry-after"] == "30"
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["store"]["reachable"] is False
        assert http.get("/healthz").status_code == 200  # alive: an orchestrator should not restart it
        metrics = http.get("/metrics").text
    assert metric(metrics, 'idcraft_store_errors_total{store="identity"}') >= 1
    assert metric(metrics, 'idcraft_store_errors_total{store="references"}') >= 1
