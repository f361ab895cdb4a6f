"""PuLID-FLUX behind `idcraft serve`: the catalog lists it with its options, a generation from a reference
photo runs the whole identity chain (world face analysis -> alignment -> EVA-CLIP -> IDFormer), and the
identity cache serves the second request."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("httpx", reason="the serve tests need httpx")

from ..serve.conftest import make_config, pixels, png_b64  # noqa: E402
from .conftest import CASE, EVA  # noqa: E402


@pytest.fixture(scope="module")
def client(flux_base, release_tensors):
    from fastapi.testclient import TestClient

    from idcraft.engine import Engine
    from idcraft.pulid.bisenet import BiSeNet
    from idcraft.pulid.eva_clip import load_eva_tower
    from idcraft.pulid.flux_pipeline import PulidFluxAdapter, PulidFluxPipeline
    from idcraft.serve.app import create_app
    from idcraft.serve.catalog import world_catalog
    from idcraft.world import bundle

    adapter = PulidFluxAdapter.from_tensors(dict(release_tensors))
    pipe = PulidFluxPipeline(flux_base, adapter, device="cpu")
    pipe.encoder.eva = load_eva_tower(EVA)
    torch.manual_seed(0)
    pipe.encoder.parser = BiSeNet(width=8, context=16, fuse=24, aux=8).eval()  # tiny, random weights
    engine = Engine(
        {"pulid-flux": pipe},
        face_backend="world",
        face_models=bundle.bundle_path(bundle.IDENTITY, bundle.bundle_dir()),
    )
    config = make_config()
    with TestClient(create_app(config, world_catalog(config, engine))) as test_client:
        yield test_client
    adapter.pulid_ca.detach()
    assert CASE.is_dir()


def test_catalog_and_generation_with_identity_cache(client):
    from idcraft.world.generate import reference_image
    from idcraft.world.identity import held_out_ids

    models = client.get("/v1/models").json()["data"]
    assert models[0]["id"] == "pulid-flux" and models[0]["family"] == "pulid-flux"
    assert "start_step" in models[0]["options"] and "true_cfg" in models[0]["options"]

    body = {
        "prompt": "portrait of the cat",
        "references": [png_b64(reference_image(held_out_ids()[0]))],
        "size": "64x48",
        "steps": 2,
        "seed": 5,
        "start_step": 1,
    }
    first = client.post("/v1/images/generations", json=body)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert answer["cache"] == "miss" and answer["settings"]["steps"] == 2
    assert pixels(answer["data"][0]["b64_json"]).shape == (48, 64, 3)
    again = client.post("/v1/images/generations", json=body | {"seed": 6}).json()
    assert again["cache"] == "hit"
    bad = client.post("/v1/images/generations", json=body | {"start_step": -1})
    assert bad.status_code == 400 and "start_step" in bad.text
