"""Cancellation and progress through the engine, for every family's pipeline: a token cancelled during a
call stops it at the next denoising step (counted with the progress callback), per call only."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from idcraft.cancel import CancelToken
from idcraft.engine import Engine, GenerationRequest
from idcraft.errors import Cancelled, IdcraftError
from idcraft.pipeline import IPAdapterPipeline
from idcraft.tiny import random_adapter

STEPS = 6


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sd_engine():
    from idcraft.encoders import ClipImageEncoder
    from idcraft.tiny import tiny_image_encoder, tiny_sd15_pipeline

    base = tiny_sd15_pipeline()
    encoder = ClipImageEncoder(tiny_image_encoder())
    return Engine([IPAdapterPipeline(base, random_adapter(base.unet, "ip-adapter", encoder), encoder)])


def _cancel_at(step: int):
    """A token and a progress callback that records every step and cancels the token at ``step``."""
    token, seen = CancelToken(), []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        if done == step:
            token.cancel("stop here")

    return token, progress, seen


def _request(**extra) -> GenerationRequest:
    return GenerationRequest(
        "a cat", references=[_image()], **{"seed": 1, "steps": STEPS, "width": 64, "height": 64, **extra}
    )


def test_cancel_stops_at_the_next_step_and_the_engine_goes_on(sd_engine):
    token, progress, seen = _cancel_at(3)
    with pytest.raises(Cancelled, match="stop here") as caught:
        sd_engine.generate(_request(), cancel=token, progress=progress)
    assert isinstance(caught.value, IdcraftError)
    assert seen[-1] == (3, STEPS)  # step 4 ran, then the check after it stopped the call


def test_progress_reports_every_step_and_a_cancelled_call_left_nothing_behind(sd_engine):
    seen = []
    result = sd_engine.generate(_request(), progress=lambda done, total: seen.append((done, total)))
    assert seen == [(k, STEPS) for k in range(STEPS + 1)]
    assert len(result.images) == 1


def test_a_token_cancelled_before_the_call_runs_nothing(sd_engine):
    token = CancelToken()
    token.cancel("client gone")
    seen = []
    with pytest.raises(Cancelled, match="client gone"):
        sd_engine.generate(_request(), cancel=token, progress=lambda d, t: seen.append(d))
    assert seen == []


def test_cancelling_one_thread_leaves_the_other_alone(sd_engine):
    token, progress, _ = _cancel_at(2)
    outcome = {}

    def cancelled() -> None:
        try:
            sd_engine.generate(_request(), cancel=token, progress=progress)
        except Cancelled:
            outcome["cancelled"] = True

    def complete() -> None:
        outcome["images"] = sd_engine.generate(_request(seed=7), cancel=CancelToken()).images

    threads = [threading.Thread(target=cancelled), threading.Thread(target=complete)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert outcome["cancelled"] and len(outcome["images"]) == 1


def test_batch_is_cancelled_too(sd_engine):
    token, progress, seen = _cancel_at(2)
    requests = [_request(seed=s) for s in (1, 2, 3)]
    with pytest.raises(Cancelled):
        sd_engine.generate_batch(requests, cancel=token, progress=progress)
    assert seen == [(0, STEPS), (1, STEPS), (2, STEPS)]


def test_instantid_with_identitynet_stops_at_the_next_step(sdxl):
    from idcraft.tiny import tiny_controlnet

    pipe = IPAdapterPipeline(
        sdxl, random_adapter(sdxl.unet, "instantid"), controlnet=tiny_controlnet(sdxl.unet)
    )
    engine = Engine([pipe])
    embedding = (np.random.default_rng(0).standard_normal(512) * 20).astype(np.float32)
    kps = np.array([[20, 24], [44, 24], [32, 36], [22, 48], [42, 48]], np.float32)
    token, progress, seen = _cancel_at(2)
    request = GenerationRequest(
        "a face", face_embeddings=[embedding], keypoints=kps, width=64, height=64, steps=STEPS
    )
    with pytest.raises(Cancelled):
        engine.generate(request, cancel=token, progress=progress)
    assert seen[-1] == (2, STEPS)


def test_instantcharacter_on_flux_stops_at_the_next_step():
    from idcraft.instantcharacter.pipeline import InstantCharacterPipeline
    from idcraft.instantcharacter.tiny import (
        random_instantcharacter,
        tiny_flux_pipeline,
        tiny_subject_encoder,
    )

    flux = tiny_flux_pipeline()
    pipe = InstantCharacterPipeline(
        flux, random_instantcharacter(flux.transformer), tiny_subject_encoder(), device="cpu"
    )
    engine = Engine([pipe])
    token, progress, seen = _cancel_at(2)
    request = GenerationRequest("a character", references=[_image()], width=64, height=64, steps=STEPS)
    with pytest.raises(Cancelled):
        engine.generate(request, cancel=token, progress=progress)
    assert seen[-1] == (2, STEPS)
