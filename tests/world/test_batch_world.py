"""``idcraft batch`` without ``--config`` runs on the bundled world, as ``serve`` and ``eval`` do."""

from __future__ import annotations

import json

from idcraft.cli import main
from idcraft.world import bundle
from idcraft.world.generate import available_methods, reference_image
from idcraft.world.models_config import world_models_config


def test_the_world_as_a_models_config():
    config = world_models_config()
    assert tuple(config.models) == available_methods() and "instantid" in config.models
    assert config.model(None).label == "ip-adapter"  # a job naming no model: the first, as serve does
    instantid, faceid, plus = (
        config.model("instantid"),
        config.model("faceid"),
        config.model("ip-adapter-plus"),
    )
    assert instantid.controlnet == str(bundle.bundle_dir() / bundle.IDENTITYNET)
    assert (faceid.face_backend, faceid.face_models) == ("world", str(bundle.bundle_dir() / bundle.IDENTITY))
    assert (
        plus.image_encoder == str(bundle.bundle_dir() / bundle.IMAGE_ENCODER) and faceid.image_encoder is None
    )
    assert {e.base for e in config.models.values()} == {
        str(bundle.bundle_dir() / bundle.SD)
    }  # one shared base
    assert plus.defaults == {"steps": 20, "guidance": 5.0} and plus.dtype == "float32"


def test_batch_without_config_generates_on_the_world(tmp_path, capsys, fake_bundle, monkeypatch):
    monkeypatch.setenv(bundle.ENV, str(fake_bundle))  # the world's layout with tiny models: fast
    reference_image(2).save(tmp_path / "ref.png")
    jobs = [
        {
            "id": "beach",
            "reference": "ref.png",
            "prompt": "a large green round creature on a beach",
            "seed": 1,
        },
        {
            "id": "snow",
            "model": "faceid",
            "reference": "ref.png",
            "prompt": "a green round creature in the snow",
        },
    ]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps({**job, "steps": 1}) + "\n" for job in jobs))
    status = main(
        [
            "batch",
            "--requests",
            str(tmp_path / "jobs.jsonl"),
            "--output",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ]
    )
    assert status == 0, capsys.readouterr()
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"], r["method"], r["error"]) for r in records] == [
        ("beach", "ip-adapter", None),
        ("snow", "faceid", None),
    ]
    assert records[0]["settings"]["guidance"] == 5.0  # the world's sampling defaults
    assert all((tmp_path / "out" / r["images"][0]).is_file() for r in records)
