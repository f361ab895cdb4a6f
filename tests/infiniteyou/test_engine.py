"""InfiniteYou through the engine: two threads on one engine each get their own image; float16 and
bfloat16 run end to end without upcasting; options it does not read are refused."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from idcraft.errors import IdcraftError

from .conftest import CASE, request_for


def _expected(name: str) -> np.ndarray:
    return np.asarray(Image.open(CASE / f"{name}.png").convert("RGB"), dtype=np.int16)


def test_two_threads_each_alone(case_args, iyou_engine):
    names = ["no_control", "scale_window"]
    results: dict[str, np.ndarray] = {}
    barrier = threading.Barrier(len(names))

    def run(name: str) -> None:
        barrier.wait()
        image = iyou_engine.generate(request_for(case_args[name])).images[0]
        results[name] = np.asarray(image.convert("RGB"), dtype=np.int16)

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in names:
        assert np.abs(results[name] - _expected(name)).max() <= 2, name


def test_identity_cache_conditioning_reused(case_args, iyou_engine):
    """The server's identity cache keeps what Engine.encode returns; generating from it is the same image."""
    from dataclasses import replace

    request = request_for(case_args["control"])
    conditioning = iyou_engine.encode(request)
    image = iyou_engine.generate(replace(request, face_embeddings=None, conditioning=conditioning)).images[0]
    assert np.abs(np.asarray(image, dtype=np.int16) - _expected("control")).max() <= 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, case_args, iyou_engine):
    from idcraft.engine import Engine
    from idcraft.infiniteyou.pipeline import InfiniteYouPipeline
    from idcraft.infiniteyou.release import load_image_proj, load_infusenet

    base = iyou_engine.pipeline()
    import copy

    pipe = copy.deepcopy(base.pipe).to(dtype=dtype)
    half = InfiniteYouPipeline(
        pipe,
        load_infusenet(CASE / "release" / "aes_stage2" / "InfuseNetModel", dtype),
        load_image_proj(CASE / "release" / "aes_stage2" / "image_proj_model.bin"),
        device="cpu",
    )
    assert half.infusenet.dtype == dtype and half.resampler.latents.dtype == dtype
    try:
        image = Engine([half]).generate(request_for(case_args["control"])).images[0]
    except RuntimeError as exc:  # a CPU build without the half kernel
        pytest.skip(f"no {dtype} kernel on this CPU build: {exc}")
    ours = np.asarray(image, dtype=np.float32)
    assert np.isfinite(ours).all()
    assert pipe.transformer.dtype == dtype and half.infusenet.dtype == dtype  # nothing upcast
    assert np.abs(ours - _expected("control")).mean() < {torch.float16: 1.0, torch.bfloat16: 4.0}[dtype]


def test_unread_option_refused(case_args, iyou_engine):
    with pytest.raises(IdcraftError, match="--s-scale"):
        iyou_engine.generate(request_for(case_args["control"], s_scale=0.5))
    with pytest.raises(IdcraftError, match="infusenet-start"):
        iyou_engine.generate(request_for(case_args["control"], infusenet_start=0.8, infusenet_end=0.2))


def test_reference_without_a_face_is_one_line_error(iyou_engine):
    from idcraft.engine import Engine
    from idcraft.requests import GenerationRequest
    from idcraft.world import bundle

    engine = Engine(
        {"infiniteyou": iyou_engine.pipeline()},
        face_backend="world",
        face_models=bundle.bundle_path(bundle.IDENTITY),
    )
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    with pytest.raises(IdcraftError, match="no face") as info:
        engine.generate(GenerationRequest("a photo", references=[blank], steps=1, width=32, height=32))
    assert "\n" not in str(info.value)


def test_cancel_stops_at_the_next_step(case_args, iyou_engine):
    """Progress is reported per step and a cancelled call stops at the next one, as for every family."""
    from idcraft.cancel import CancelToken
    from idcraft.errors import Cancelled

    args = case_args["no_control"]
    token, seen = CancelToken(), []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 1:
            token.cancel("stop here")

    with pytest.raises(Cancelled, match="stop here"):
        iyou_engine.generate(request_for(args), cancel=token, progress=progress)
    assert seen == [(0, args["steps"]), (1, args["steps"])]
