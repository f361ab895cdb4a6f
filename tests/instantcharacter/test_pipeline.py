"""Generation on a tiny FluxPipeline: scale 0 is the base model exactly; the subject acts otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idcraft.errors import IdcraftError
from idcraft.instantcharacter.pipeline import InstantCharacterPipeline, flux_dtype

RUN = {"seed": 3, "steps": 2, "width": 64, "height": 64, "progress": False}


@pytest.fixture
def pipe(flux, ic_adapter, subject_encoder):
    p = InstantCharacterPipeline(flux, ic_adapter, subject_encoder, device="cpu")
    yield p
    ic_adapter.detach()


def _base(flux) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(RUN["seed"])
    flux.set_progress_bar_config(disable=True)
    image = flux("a cat", num_inference_steps=2, width=64, height=64, generator=generator).images[0]
    return np.asarray(image)


def test_scale_zero_is_the_base_pipeline_and_scale_acts(pipe, flux, features):
    zero = np.asarray(pipe("a cat", features=features, scale=0, **RUN)[0])
    subject = np.asarray(pipe("a cat", features=features, scale=1.0, **RUN)[0])
    pipe.adapter.detach()
    assert np.array_equal(zero, _base(flux))
    assert np.abs(zero.astype(int) - subject.astype(int)).max() > 10


def test_subject_tokens_follow_the_scheduler_timestep(pipe, features):
    seen, steps = [], []
    original = pipe.adapter.projector.tokens

    def spy(prepared, timestep):
        seen.append((timestep.item(), timestep.dtype))
        return original(prepared, timestep)

    def record(module, args, kwargs):  # the pipeline passes the scheduler's t / 1000
        steps.append(kwargs["timestep"].reshape(-1)[0].item() * 1000)

    pipe.adapter.projector.tokens = spy
    hook = pipe.pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe("a cat", features=features, scale=0.8, true_cfg=2.0, negative_prompt="dog", **RUN)
    finally:
        del pipe.adapter.projector.tokens
        hook.remove()
    # once per step (the negative pass reuses them), at t in 0..1000, in the latents' dtype
    assert len(seen) == 2 and all(d == torch.float32 for _, d in seen)
    assert len(steps) == 4 and steps[0] == steps[1] and steps[2] == steps[3]
    assert [t for t, _ in seen] == pytest.approx([steps[0], steps[2]], rel=1e-5)
    assert seen[0][0] > seen[1][0] > 1


def test_reference_required(pipe):
    with pytest.raises(IdcraftError, match="needs a reference image"):
        pipe("a cat", **RUN)


def test_offload_needs_a_gpu(flux, ic_adapter, subject_encoder):
    with pytest.raises(IdcraftError, match=r"--offload model .* on the CPU"):
        InstantCharacterPipeline(flux, ic_adapter, subject_encoder, offload="model", device="cpu")


def test_bfloat16_by_default_on_a_gpu():
    assert flux_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert flux_dtype("auto", torch.device("cpu")) == torch.float32
    assert flux_dtype("float16", torch.device("cuda")) == torch.float16
