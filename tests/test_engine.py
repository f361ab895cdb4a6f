"""The engine: one entry point for every method, requests that share nothing, options checked per method."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from idcraft.engine import Conditioning, Engine, GenerationRequest
from idcraft.errors import IdcraftError
from idcraft.pipeline import IPAdapterPipeline
from idcraft.tiny import random_adapter

STEPS = 3


@pytest.fixture(scope="module")
def engine():
    """Three methods on one tiny SD1.5 base: two of the IP-Adapter family and FaceID (LoRA everywhere)."""
    from idcraft.encoders import ClipImageEncoder
    from idcraft.tiny import tiny_image_encoder, tiny_sd15_pipeline

    base = tiny_sd15_pipeline()
    encoder = ClipImageEncoder(tiny_image_encoder())
    pipelines = {
        method: IPAdapterPipeline(
            base, random_adapter(base.unet, method, encoder, seed=k), encoder if method != "faceid" else None
        )
        for k, method in enumerate(("ip-adapter", "ip-adapter-plus", "faceid"))
    }
    return Engine(pipelines, face_backend="default")


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _embedding(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(512).astype(np.float32)


def _requests() -> list[GenerationRequest]:
    two_faces = [[[12, 20], [24, 20], [18, 28], [13, 36], [23, 36]], [[40, 20], [52, 20], [46, 28], [41, 36], [51, 36]]]
    return [
        GenerationRequest("a cat", method="ip-adapter", references=[_image(1)], scale=0.6, seed=1, steps=STEPS),
        GenerationRequest(
            "a dog", method="ip-adapter-plus", references=[_image(2)], scale=1.0, seed=2, steps=STEPS
        ),
        GenerationRequest(
            "two people",
            method="faceid",
            face_embeddings=[_embedding(3), _embedding(4)],
            multi_person=True,
            keypoints=np.asarray(two_faces, dtype=np.float64),
            width=64,
            height=64,
            scale=0.8,
            seed=3,
            steps=STEPS,
        ),
    ]


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image) for image in result.images])


def test_requests_at_once_in_threads_give_the_images_each_gives_alone(engine):
    requests = _requests()
    alone = [_pixels(engine.generate(r)) for r in requests]
    assert not np.array_equal(alone[0], alone[1])
    for _ in range(2):
        for got, expected in zip(_at_once(engine, requests), alone, strict=True):
            np.testing.assert_array_equal(got, expected)


def _at_once(engine, requests) -> list:
    """Every request in its own thread, all released together."""
    together: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def work(index: int) -> None:
        start.wait()
        together[index] = _pixels(engine.generate(requests[index]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return together


def test_nothing_about_a_request_is_left_on_shared_objects(engine):
    before = {
        name: (pipe.adapter.scale, pipe.adapter.layout.num_tokens, pipe.adapter.layout.regions)
        for name, pipe in ((m, engine.pipeline(m)) for m in engine.methods)
    }
    scheduler = engine.pipeline("ip-adapter").pipe.scheduler
    timesteps = None if scheduler.timesteps is None else scheduler.timesteps.clone()
    for request in _requests():
        engine.generate(request)
    after = {
        name: (pipe.adapter.scale, pipe.adapter.layout.num_tokens, pipe.adapter.layout.regions)
        for name, pipe in ((m, engine.pipeline(m)) for m in engine.methods)
    }
    assert after == before
    now = engine.pipeline("ip-adapter").pipe.scheduler.timesteps
    assert (now is None and timesteps is None) or np.array_equal(np.asarray(now), np.asarray(timesteps))


def test_encoded_conditioning_is_reused_and_tagged_with_its_method(engine):
    request = _requests()[0]
    encoded = engine.encode(request)
    assert isinstance(encoded, Conditioning) and encoded.method == "ip-adapter"
    reused = engine.generate(GenerationRequest("a cat", method="ip-adapter", conditioning=encoded, scale=0.6, seed=1, steps=STEPS))
    np.testing.assert_array_equal(_pixels(reused), _pixels(engine.generate(request)))
    assert reused.timings["encode_s"] == 0.0
    with pytest.raises(IdcraftError, match="made for ip-adapter, not ip-adapter-plus"):
        engine.generate(GenerationRequest("a dog", method="ip-adapter-plus", conditioning=encoded, steps=STEPS))


def test_batch_of_several_people_runs_them_one_at_a_time(engine):
    request = _requests()[2]
    results = engine.generate_batch([request, request])
    alone = _pixels(engine.generate(request))
    assert len(results) == 2 and all(np.array_equal(_pixels(r), alone) for r in results)


def test_batch_gives_each_request_its_own_image(engine):
    requests = [
        GenerationRequest(p, method="ip-adapter", references=[_image(s)], seed=s, steps=STEPS)
        for p, s in (("a cat", 5), ("a dog", 6))
    ]
    batched = engine.generate_batch(requests)
    for result, request in zip(batched, requests, strict=True):
        alone = _pixels(engine.generate(request))
        assert np.abs(_pixels(result).astype(int) - alone).max() <= 2  # batched kernels round differently
        assert result.seed == request.seed


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "instantid"}, "not loaded here"),
        ({"method": "nope"}, "unknown method"),
        ({"method": None}, "several methods"),
        ({"keypoints": [[1, 2]] * 5}, "--keypoints: not used by ip-adapter"),
        ({"s_scale": 0.5}, "--s-scale: not used by ip-adapter"),
        ({"true_cfg": 2.0}, "--true-cfg: not used"),
        ({"width": 65}, "not a multiple of 8"),
        ({"scale": float("nan")}, "--scale must be a finite number"),
        ({"guidance": float("inf")}, "--guidance must be a finite number"),
        ({"seed": 10**23}, "--seed must be a whole number"),
        ({"steps": 0}, "--steps must be"),
        ({"width": 100000, "height": 100000}, "over the limit"),
    ],
)
def test_bad_requests_are_refused_before_anything_runs(engine, changes, message):
    from dataclasses import replace

    request = replace(_requests()[0], **changes)
    with pytest.raises(IdcraftError, match=message):
        engine.generate(request)


def test_results_say_what_was_used(engine):
    result = engine.generate(replace_seed(_requests()[0], None))
    assert result.method == "ip-adapter" and isinstance(result.seed, int)
    assert result.settings["steps"] == STEPS and result.settings["guidance"] == 7.5
    assert set(result.timings) == {"encode_s", "generate_s", "total_s"}
    again = engine.generate(replace_seed(_requests()[0], result.seed))
    np.testing.assert_array_equal(_pixels(again), _pixels(result))
    long = engine.generate(GenerationRequest("cat " * 200, method="ip-adapter", references=[_image(1)], steps=1))
    assert any("tokens" in w for w in long.warnings)


def replace_seed(request: GenerationRequest, seed):
    from dataclasses import replace

    return replace(request, seed=seed)
