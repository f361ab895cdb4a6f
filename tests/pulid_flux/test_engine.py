"""PuLID-FLUX in the engine: two threads on one loaded pipeline each get their image alone; float16 and
bfloat16 run and stay close to float32."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from idcraft.engine import Engine, GenerationRequest

from .conftest import CASE, case_tokens


def _engine(dtype: torch.dtype = torch.float32) -> Engine:
    from diffusers import FluxPipeline

    from idcraft.pulid.flux_pipeline import PulidFluxAdapter, PulidFluxPipeline

    base = FluxPipeline.from_pretrained(str(CASE / "base"), torch_dtype=dtype)
    adapter = PulidFluxAdapter.from_file(CASE / "pulid_flux_tiny.safetensors")
    return Engine([PulidFluxPipeline(base, adapter, device="cpu")])


def _request(**overrides) -> GenerationRequest:
    settings = dict(
        prompt="portrait of the cat", conditioning=case_tokens(), steps=2, width=64, height=48, seed=3
    )
    return GenerationRequest(**(settings | overrides))


@pytest.fixture(scope="module")
def engine():
    return _engine()


def test_two_threads_each_get_their_image_alone(engine):
    requests = {
        "a": _request(scale=1.0, seed=1),
        "b": _request(scale=0.4, seed=2, start_step=1, true_cfg=2.0, negative_prompt="painting"),
    }
    alone = {k: np.asarray(engine.generate(r).images[0]) for k, r in requests.items()}
    assert np.abs(alone["a"].astype(int) - alone["b"].astype(int)).mean() > 1
    results, barrier = {}, threading.Barrier(2)

    def run(key):
        barrier.wait()
        results[key] = np.asarray(engine.generate(requests[key]).images[0])

    threads = [threading.Thread(target=run, args=(k,)) for k in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key, image in alone.items():
        assert np.array_equal(results[key], image)


def test_settings_and_defaults_are_the_official_apps(engine):
    method, request = engine.prepare(GenerationRequest("x", conditioning=case_tokens()))
    assert method.name == "pulid-flux"
    assert (request.steps, request.guidance, request.scale, request.start_step) == (28, 4.0, 1.0, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(engine, dtype):
    reference = np.asarray(engine.generate(_request()).images[0], dtype=np.int16)
    half = _engine(dtype)
    pipe = half.pipeline()
    assert pipe.pipe.transformer.dtype == dtype and pipe.adapter.pulid_ca.ca[0].to_q.weight.dtype == dtype
    image = np.asarray(half.generate(_request()).images[0], dtype=np.int16)
    pipe.adapter.pulid_ca.detach()
    assert np.isfinite(image).all()
    assert np.abs(image - reference).mean() < 12
