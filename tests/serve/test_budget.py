"""Issue 28: the server's config sets the compute budget (limits.max_pixel_steps), and a request over it
is a 400 stating its cost and the limit, refused before any work."""

from __future__ import annotations

from .conftest import STEPS, world_catalog


def test_a_request_over_the_configured_budget_is_a_400(world, references, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from idcraft.requests import Limits
    from idcraft.serve.app import create_app
    from idcraft.serve.config import load_config

    monkeypatch.delenv("IDCRAFT_API_TOKEN", raising=False)
    path = tmp_path / "serve.yaml"
    budget = 64 * 64 * STEPS  # one 64 px world image at the test's steps, no more
    path.write_text(f"limits: {{max_pixel_steps: {budget}}}\n")
    config = load_config(path)
    assert config.limits.max_pixel_steps == budget
    try:
        app = create_app(config, world_catalog(world, config))
        with TestClient(app) as client:
            body = {"prompt": "a portrait", "references": [references[0]], "steps": STEPS, "size": "64x64"}
            over = client.post("/v1/images/generations", json={**body, "n": 2})
            assert over.status_code == 400, over.text
            message = over.json()["error"]["message"]
            assert "pixel-steps" in message and "at most 1 image(s)" in message
            assert client.post("/v1/images/generations", json=body).status_code == 200
    finally:
        world.limits = Limits()  # the world engine is shared by the whole serve suite
