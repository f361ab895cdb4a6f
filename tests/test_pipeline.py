"""Generation on tiny SD1.5 and SDXL pipelines: scale 0, references, ControlNet, compatibility checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idcraft.errors import IncompatibleAdapterError
from idcraft.pipeline import IPAdapterPipeline
from idcraft.tiny import random_adapter, tiny_controlnet, tiny_image_encoder

METHODS = ["ip-adapter", "ip-adapter-plus", "ip-adapter-full-face"]
SETTINGS = dict(steps=2, guidance=5.0, width=64, height=64, seed=7, progress=False)


def _arr(images) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def _base_images(pipe, prompt="a red ball", num_images=1):
    out = pipe(
        prompt=prompt,
        negative_prompt="",
        num_inference_steps=SETTINGS["steps"],
        guidance_scale=SETTINGS["guidance"],
        width=64,
        height=64,
        num_images_per_prompt=num_images,
        generator=torch.Generator("cpu").manual_seed(SETTINGS["seed"]),
    )
    return out.images


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
@pytest.mark.parametrize("method", METHODS)
def test_scale_zero_is_base_model_and_scale_one_is_not(request, base, method, encoder, reference_image):
    pipe = request.getfixturevalue(base)
    pipe.set_progress_bar_config(disable=True)
    plain = _arr(_base_images(pipe))
    ip = IPAdapterPipeline(pipe, random_adapter(pipe.unet, method, encoder.model), encoder)
    zero = _arr(ip("a red ball", reference_image, scale=0.0, **SETTINGS))
    one = _arr(ip("a red ball", reference_image, scale=1.0, **SETTINGS))
    assert np.array_equal(zero, plain)
    assert np.abs(one - plain).mean() > 1.0
    ip.adapter.detach()
    assert np.array_equal(_arr(_base_images(pipe)), plain), "detach restores the base model"


def test_reference_content_changes_the_output(sd15, encoder, reference_image):
    ip = IPAdapterPipeline(sd15, random_adapter(sd15.unet, "ip-adapter", encoder.model), encoder)
    a = _arr(ip("a red ball", reference_image, **SETTINGS))
    b = _arr(ip("a red ball", reference_image.transpose(0), **SETTINGS))
    again = _arr(ip("a red ball", reference_image, **SETTINGS))
    assert np.array_equal(a, again), "same seed, same image"
    assert np.abs(a - b).mean() > 0.5


@pytest.mark.parametrize("method", ["ip-adapter", "ip-adapter-plus"])
def test_several_references_combine_side_by_side(sd15, encoder, reference_image, method):
    ip = IPAdapterPipeline(sd15, random_adapter(sd15.unet, method, encoder.model), encoder)
    one = ip.encode_references([reference_image])
    two = ip.encode_references([reference_image, reference_image.transpose(0)])
    per_image = one.cond.shape[1]
    assert two.cond.shape == (1, 2 * per_image, one.cond.shape[2])
    assert torch.allclose(two.cond[:, :per_image], one.cond, atol=1e-5)
    # Attending over two copies of the same tokens is attending over one copy: same image.
    twice = _arr(ip("a red ball", [reference_image, reference_image], **SETTINGS))
    once = _arr(ip("a red ball", reference_image, **SETTINGS))
    assert np.abs(twice - once).max() <= 1


def test_num_images_gives_distinct_images(sd15, encoder, reference_image):
    ip = IPAdapterPipeline(sd15, random_adapter(sd15.unet, "ip-adapter", encoder.model), encoder)
    images = ip("a red ball", reference_image, num_images=2, **SETTINGS)
    assert len(images) == 2 and not np.array_equal(*_arr(images))


def test_uncond_branch_follows_the_official_rules(sd15, encoder, reference_image):
    pooled = IPAdapterPipeline(sd15, random_adapter(sd15.unet, "ip-adapter", encoder.model), encoder)
    tokens = pooled.encode_references([reference_image])
    proj = pooled.adapter.image_proj
    assert torch.allclose(tokens.uncond, proj(torch.zeros(1, proj.config.embed_dim)), atol=1e-6)
    pooled.adapter.detach()

    plus = IPAdapterPipeline(sd15, random_adapter(sd15.unet, "ip-adapter-plus", encoder.model), encoder)
    tokens = plus.encode_references([reference_image])
    zero_pixels = torch.zeros(1, 3, 224, 224)
    expected = plus.adapter.image_proj(
        encoder.model(zero_pixels, output_hidden_states=True).hidden_states[-2]
    )
    assert torch.allclose(tokens.uncond, expected, atol=1e-5)


def test_mismatched_base_model_is_named(sd15, sdxl, encoder):
    sd_adapter = random_adapter(sd15.unet, "ip-adapter", encoder.model)
    with pytest.raises(IncompatibleAdapterError, match=r"cross-attention width 32.*has 64"):
        sd_adapter.check_compatible(sdxl.unet, encoder.config)


def test_mismatched_block_layout_is_named(sd15, sdxl, encoder):
    from idcraft.tiny import tiny_sd15_unet

    other = tiny_sd15_unet(cross_attention_dim=64)
    with pytest.raises(IncompatibleAdapterError, match="cross-attention layers"):
        random_adapter(other, "ip-adapter", encoder.model).check_compatible(sdxl.unet, encoder.config)


@pytest.mark.parametrize("method, width", [("ip-adapter", "40"), ("ip-adapter-plus", "48")])
def test_mismatched_image_encoder_is_named(sd15, encoder, method, width):
    adapter = random_adapter(sd15.unet, method, encoder.model)
    other = tiny_image_encoder(hidden=64, projection=24)
    with pytest.raises(IncompatibleAdapterError, match=rf"width {width}.*gives .* width (24|64)"):
        IPAdapterPipeline(sd15, adapter, type(encoder)(other))


def test_controlnet_sees_text_only(sd15, encoder, reference_image):
    controlnet = tiny_controlnet(sd15.unet)
    adapter = random_adapter(sd15.unet, "ip-adapter", encoder.model)
    ip = IPAdapterPipeline(sd15, adapter, encoder, controlnet=controlnet)
    tokens = ip.encode_references([reference_image])
    text = torch.randn(1, 77, 32)
    sample, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    cond = torch.rand(1, 3, 16, 16)  # the tiny ControlNet downsamples its condition 2x, to latent size
    adapter.layout.num_tokens = tokens.cond.shape[1]
    with_tokens = controlnet(sample, t, torch.cat([text, tokens.cond], 1), cond, return_dict=False)
    adapter.layout.num_tokens = 0
    text_only = controlnet(sample, t, text, cond, return_dict=False)
    for a, b in zip([*with_tokens[0], with_tokens[1]], [*text_only[0], text_only[1]], strict=False):
        assert torch.equal(a, b)
    images = ip("a red ball", reference_image, control_image=np.zeros((64, 64, 3), np.uint8), **SETTINGS)
    assert images[0].size == (64, 64)
