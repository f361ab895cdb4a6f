"""``idcraft serve``'s config file, and serving models named in it (here: the world bundle's own files,
as a user would name official checkpoints)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from idcraft.cli import main
from idcraft.errors import IdcraftError
from idcraft.model_config import models_config_from_dict
from idcraft.serve.config import config_from_dict, load_config

from .conftest import STEPS, pixels


def test_no_config_serves_the_world():
    config = load_config(None)
    assert config.uses_world and config.server.concurrency_per_device == 1
    assert config.server.auth_token_env == "IDCRAFT_API_TOKEN" and config.server.cors_origins == []


def test_config_file_is_read_and_checked(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(
        "models:\n"
        "  ip-adapter-plus:\n"
        "    base: ./sd\n"
        "    adapter: ./plus.safetensors\n"
        "    image_encoder: ./image_encoder\n"
        "    dtype: float16\n"
        "    defaults: {steps: 30, scale: 0.7}\n"
        "server: {queue_length: 3, request_timeout_s: 20, cors_origins: http://localhost:3000}\n"
        "limits: {max_steps: 50}\n"
    )
    (tmp_path / "sd").mkdir()
    config = load_config(path)
    model = config.models["ip-adapter-plus"]
    assert model.method == "ip-adapter-plus" and model.defaults == {"steps": 30, "scale": 0.7}
    assert model.base == str(tmp_path / "sd")  # relative to the config's folder where it exists there
    assert model.adapter == "./plus.safetensors"  # left as given otherwise (a hub id stays one)
    assert config.server.queue_length == 3 and config.server.request_timeout_s == 20.0
    assert config.server.cors_origins == ["http://localhost:3000"] and config.limits.max_steps == 50
    assert not config.uses_world


@pytest.mark.parametrize(
    "data, message",
    [
        ({"server": {"queue_lenght": 3}}, "unknown key(s) queue_lenght"),
        ({"server": {"queue_length": "many"}}, "expected a number"),
        ({"server": {"concurrency_per_device": 0}}, "at least 1"),
        ({"limits": {"max_steps": 2.5}}, "whole number"),
        ({"models": {"ip-adapter": {"base": "x"}}}, "adapter is required"),
        ({"models": {"ip-adapter": {"base": "x", "adapter": "y", "defaults": {"stpes": 3}}}}, "stpes"),
        ({"models": {"ip-adapter": {"base": "x", "adapter": "y", "offload": "model"}}}, "FLUX.1) only"),
        ({"models": {"sd15": {"base": "x", "adapter": "y"}}}, "give `method:`"),
        ({"bogus": 1}, "unknown key(s) bogus"),
    ],
)
def test_bad_config_names_the_key(data, message):
    with pytest.raises(IdcraftError, match=None) as info:
        config_from_dict(data)
    assert message in str(info.value)


def test_cli_reports_a_bad_config(tmp_path, capsys):
    path = tmp_path / "serve.yaml"
    path.write_text("server: {queue_lenght: 3}\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "queue_lenght" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_models_from_files_share_one_base_and_match_the_world(tmp_path, world, references, monkeypatch):
    from idcraft.serve.app import create_app
    from idcraft.serve.catalog import build_catalog
    from idcraft.world import bundle

    monkeypatch.delenv("IDCRAFT_API_TOKEN", raising=False)
    root = bundle.bundle_dir()
    sd, encoder = root / bundle.SD, root / bundle.IMAGE_ENCODER
    data = {
        "face_backend": "world",
        "face_models": str(root / bundle.IDENTITY),
        "models": {
            "ip-adapter": {
                "base": str(sd),
                "adapter": str(root / bundle.ADAPTERS["ip-adapter"]),
                "image_encoder": str(encoder),
                "device": "cpu",
                "dtype": "float32",
                "defaults": {"steps": STEPS},
            },
            "faceid": {
                "base": str(sd),
                "adapter": str(root / bundle.ADAPTERS["faceid"]),
                "device": "cpu",
                "dtype": "float32",
                "defaults": {"steps": STEPS, "guidance": 5.0},
            },
        },
    }
    config = config_from_dict(data)
    catalog = build_catalog(config)
    assert catalog.methods == ("ip-adapter", "faceid", "none") and not catalog.world
    ip, face = catalog.get("ip-adapter"), catalog.get("faceid")
    assert ip.engine.pipeline("ip-adapter").pipe.unet is face.engine.pipeline("faceid").pipe.unet  # one base
    with TestClient(create_app(config, catalog)) as http:
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert (
            models["ip-adapter"]["defaults"]["steps"] == STEPS
            and models["ip-adapter"]["defaults"]["width"] == 64
        )
        body = {"prompt": "a portrait", "references": [references[0]], "seed": 3, "guidance": 5.0}
        from_files = http.post("/v1/images/generations", json=body).json()
        face_answer = http.post("/v1/images/generations", json={**body, "method": "faceid"})
        assert face_answer.status_code == 200, face_answer.text
    from idcraft.requests import GenerationRequest
    from idcraft.world.generate import reference_image
    from idcraft.world.identity import held_out_ids

    request = GenerationRequest(
        "a portrait",
        method="ip-adapter",
        references=[reference_image(held_out_ids()[0])],
        seed=3,
        steps=STEPS,
        guidance=5.0,
    )
    expected = np.asarray(world.generate(request).images[0])
    assert np.array_equal(pixels(from_files["data"][0]["b64_json"]), expected)


def test_the_documented_config_parses():
    import re
    from pathlib import Path

    import yaml

    docs = Path(__file__).resolve().parents[2] / "docs"
    block = re.search(r"```yaml\n(# serve.yaml.*?)```", (docs / "serve.md").read_text(), re.DOTALL)
    assert block, "the config example is missing from docs/serve.md"
    data = yaml.safe_load(block.group(1))
    config = config_from_dict(data)
    assert [m.method for m in config.models.values()] == ["ip-adapter-plus", "faceid-plusv2", "instantid"]
    assert config.server.auth_token_env == "IDCRAFT_API_TOKEN" and config.limits.max_steps == 500
    # idcraft eval/batch read the same file (its server and world sections ignored), and their own example
    assert list(models_config_from_dict(data).models) == list(config.models)
    block = re.search(r"```yaml\n(models: .*?)```", (docs / "evaluation.md").read_text(), re.DOTALL)
    evaluation = models_config_from_dict(yaml.safe_load(block.group(1)))
    assert list(evaluation.models) == ["ip-adapter-plus-face", "faceid-plusv2", "instantid"]
    assert list(evaluation.recipes) == ["lcm", "light"] and set(evaluation.extra) == {"grid", "scoring"}
