"""Method ``none``: the prompt alone on the base model the adapters share, every adapter off -- the same
images as that pipeline with no adapter attached, next to adapter requests on the same engine."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from idcraft.engine import Engine, GenerationRequest
from idcraft.errors import IdcraftError
from idcraft.pipeline import IPAdapterPipeline
from idcraft.tiny import random_adapter, tiny_controlnet, tiny_image_encoder, tiny_sd15_pipeline

STEPS = 1


def _plain(prompt: str, seed: int, **kwargs) -> np.ndarray:
    """What a fresh base pipeline (the same random weights, nothing attached) draws."""
    base = tiny_sd15_pipeline()
    base.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    out = base(prompt, generator=generator, num_inference_steps=STEPS, guidance_scale=7.5, **kwargs)
    return np.asarray(out.images[0])


@pytest.fixture(scope="module")
def engine():
    from idcraft.encoders import ClipImageEncoder

    base = tiny_sd15_pipeline()
    encoder = ClipImageEncoder(tiny_image_encoder())
    pipelines = {
        method: IPAdapterPipeline(
            base, random_adapter(base.unet, method, encoder, seed=k), encoder if method != "faceid" else None
        )
        for k, method in enumerate(("ip-adapter", "faceid"))
    }
    return Engine(pipelines, face_backend="default")


def test_text_only_is_the_base_model_alone(engine):
    request = GenerationRequest("a cat", method="none", seed=3, steps=STEPS, negative_prompt="blurry")
    result = engine.generate(request)
    assert result.method == "none" and result.settings["scale"] is None
    image = np.asarray(result.images[0])
    assert np.array_equal(image, _plain("a cat", 3, negative_prompt="blurry"))
    assert np.array_equal(np.asarray(engine.generate(request).images[0]), image)  # same seed, same image
    other = np.asarray(
        engine.generate(GenerationRequest("a cat", method="none", seed=4, steps=STEPS)).images[0]
    )
    assert not np.array_equal(other, image)
    # an adapter call on the same base draws something else: the adapters are attached, just not acting
    reference = np.full((64, 64, 3), 200, np.uint8)
    adapter_request = GenerationRequest(
        "a cat", method="ip-adapter", references=[reference], seed=3, steps=STEPS, negative_prompt="blurry"
    )
    adapter = np.asarray(engine.generate(adapter_request).images[0])
    assert not np.array_equal(adapter, image)
    # both at the same time on one engine: each gets what it gets alone
    requests = [request, adapter_request]
    out: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        out[i] = np.asarray(engine.generate(requests[i]).images[0])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert np.array_equal(out[0], image) and np.array_equal(out[1], adapter)
    assert engine.text_only and engine.pipeline("base") is engine.pipeline("ip-adapter").pipe


def test_text_only_refuses_what_it_cannot_use(engine):
    with pytest.raises(IdcraftError, match="prompt alone"):
        engine.prepare(GenerationRequest("x", method="none", references=[np.zeros((8, 8, 3), np.uint8)]))
    with pytest.raises(IdcraftError, match="--scale: not used by none"):
        engine.prepare(GenerationRequest("x", method="none", scale=0.5))
    with pytest.raises(IdcraftError, match="--multi-person: not used by none"):
        engine.prepare(GenerationRequest("x", method="none", multi_person=True))


def test_merged_lora_is_not_the_base_model():
    """FaceID alone on a base merges its LoRA into the weights: text-only there would not be the base."""
    base = tiny_sd15_pipeline()
    engine = Engine({"faceid": IPAdapterPipeline(base, random_adapter(base.unet, "faceid", None))})
    with pytest.raises(IdcraftError, match="LoRA is merged"):
        engine.generate(GenerationRequest("x", method="none", steps=STEPS))


def test_instantid_only_engine_and_a_plain_base():
    """Only a ControlNet pipeline loaded (InstantID): text-only runs on its models without the ControlNet;
    a plain diffusers pipeline given as ``none`` works too."""
    from idcraft.encoders import ClipImageEncoder

    base = tiny_sd15_pipeline()
    encoder = ClipImageEncoder(tiny_image_encoder())
    adapter = random_adapter(base.unet, "instantid", encoder)
    pipe = IPAdapterPipeline(base, adapter, None, controlnet=tiny_controlnet(base.unet))
    expected = _plain("a dog", 5)
    got = Engine({"instantid": pipe}).generate(GenerationRequest("a dog", method="none", seed=5, steps=STEPS))
    assert np.array_equal(np.asarray(got.images[0]), expected)
    alone = Engine({"none": tiny_sd15_pipeline()})
    assert alone.methods == ("none",)
    got = alone.generate(GenerationRequest("a dog", method="text-only", seed=5, steps=STEPS))
    assert np.array_equal(np.asarray(got.images[0]), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_text_only_in_half_precision(dtype):
    base = tiny_sd15_pipeline().to(dtype=dtype)
    result = Engine({"none": base}).generate(GenerationRequest("a cat", method="none", seed=1, steps=1))
    image = np.asarray(result.images[0]).astype(float)
    assert base.unet.dtype == base.vae.dtype == dtype
    assert image.shape == (32, 32, 3) and image.std() > 1  # not NaN decoded as black


def test_cli_generate_with_method_none(tmp_path, capsys):
    """``idcraft generate --method none``: the base folder alone, no adapter, no reference."""
    from PIL import Image

    from idcraft.cli import main

    tiny_sd15_pipeline().save_pretrained(tmp_path / "base")
    args = ["generate", "--base", str(tmp_path / "base"), "--method", "none", "--prompt", "a cat"]
    args += ["--seed", "3", "--steps", str(STEPS), "--device", "cpu", "--output", str(tmp_path / "cat.png")]
    assert main(args) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cat.png").convert("RGB")), _plain("a cat", 3))
    assert main([*args[:-1], str(tmp_path / "other.png"), "--adapter", "x.bin"]) == 2
    assert "leave out --adapter" in capsys.readouterr().err
    assert main(["generate", "--base", str(tmp_path / "base"), "--prompt", "x", "--output", "y.png"]) == 2
    assert "--method none for the base model alone" in capsys.readouterr().err
