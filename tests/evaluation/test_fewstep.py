"""Few-step recipes applied once at load time: the scheduler is replaced, the distilled weights are fused
into the UNet (and the LoRA layers removed), generation runs, and requests leave the shared pipeline as
it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from idcraft.errors import IdcraftError
from idcraft.fewstep import apply_recipe, get_recipe, recommended_settings, steps_in_name

from .conftest import save_lora


def _to_q(unet):
    return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q


def test_steps_in_file_names():
    assert steps_in_name("sdxl_lightning_4step_lora.safetensors") == 4
    assert steps_in_name("sdxl_lightning_8step_unet.safetensors") == 8
    assert steps_in_name("Hyper-SD15-8steps-CFG-lora.safetensors") == 8
    assert steps_in_name("Hyper-SDXL-1step-lora.safetensors") == 1
    assert steps_in_name("lcm-lora-sdv1-5/pytorch_lora_weights.safetensors") is None
    assert recommended_settings("hyper-sd", "Hyper-SD15-8steps-CFG-lora.safetensors") == (8, 5.0)
    assert recommended_settings("lightning", "sdxl_lightning_2step_lora.safetensors") == (2, 0.0)
    assert recommended_settings("lcm") == (4, 1.0)
    with pytest.raises(IdcraftError, match="unknown few-step recipe"):
        get_recipe("turbo")


def test_lcm_lora_is_fused_and_the_scheduler_replaced(tmp_path):
    from diffusers import LCMScheduler

    from idcraft.tiny import tiny_sd15_pipeline

    lora = save_lora(tiny_sd15_pipeline().unet, tmp_path / "lcm" / "pytorch_lora_weights.safetensors")
    pipe = tiny_sd15_pipeline()
    before = _to_q(pipe.unet).weight.detach().clone()
    settings = apply_recipe(pipe, "lcm-lora", lora)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert (settings.steps, settings.guidance, settings.weights) == (4, 1.0, "lora")
    layer = _to_q(pipe.unet)
    assert type(layer) is torch.nn.Linear, "the LoRA is fused and its layers removed"
    assert (layer.weight - before).abs().max() > 1e-3
    assert not any("lora" in name for name in pipe.unet.state_dict())
    image = pipe(
        "a cat", num_inference_steps=2, guidance_scale=settings.guidance, height=32, width=32
    ).images[0]
    assert np.asarray(image).std() > 0
    with pytest.raises(IdcraftError, match="already carries"):
        apply_recipe(pipe, "lcm-lora", lora)


def test_recipe_on_an_engine_keeps_the_adapter_and_requests_change_nothing(tmp_path):
    from diffusers import DDIMScheduler

    from idcraft.encoders import ClipImageEncoder
    from idcraft.engine import Engine, GenerationRequest
    from idcraft.pipeline import IPAdapterPipeline
    from idcraft.tiny import random_adapter, tiny_image_encoder, tiny_sd15_pipeline

    lora = save_lora(tiny_sd15_pipeline().unet, tmp_path / "Hyper-SD15-2steps-lora.safetensors")
    base = tiny_sd15_pipeline()
    encoder = ClipImageEncoder(tiny_image_encoder())
    engine = Engine(
        {"ip-adapter": IPAdapterPipeline(base, random_adapter(base.unet, "ip-adapter", encoder), encoder)}
    )
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    request = GenerationRequest("a cat", references=[reference], seed=1, steps=2, width=64, height=64)
    plain = np.asarray(engine.generate(request).images[0])
    adapter_keys = {k for k in base.unet.state_dict() if ".processor." in k}

    settings = apply_recipe(engine, "hyper-sd", lora)
    assert (settings.steps, settings.guidance) == (2, 0.0)
    scheduler = base.scheduler
    assert isinstance(scheduler, DDIMScheduler) and scheduler.config.timestep_spacing == "trailing"
    assert {k for k in base.unet.state_dict() if ".processor." in k} == adapter_keys
    fast = GenerationRequest(
        "a cat",
        references=[reference],
        seed=1,
        steps=settings.steps,
        guidance=settings.guidance,
        width=64,
        height=64,
    )
    first = np.asarray(engine.generate(fast).images[0])
    assert not np.array_equal(first, plain)
    # the request ran on a view with its own scheduler: the shared one is untouched and the next call equal
    assert base.scheduler is scheduler and len(scheduler.timesteps) == 1000  # set_timesteps never ran on it
    assert np.array_equal(np.asarray(engine.generate(fast).images[0]), first)


def test_lightning_unet_file_and_base_checks(tmp_path):
    from diffusers import EulerDiscreteScheduler
    from safetensors.torch import save_file

    from idcraft.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    state = {k: v + 0.01 for k, v in tiny_sdxl_pipeline(seed=5).unet.state_dict().items()}
    path = tmp_path / "sdxl_lightning_2step_unet.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    settings = apply_recipe(pipe, "sdxl-lightning", path)
    assert (settings.steps, settings.guidance, settings.weights) == (2, 0.0, "unet")
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    key = next(iter(state))
    assert torch.equal(pipe.unet.state_dict()[key], state[key])
    pipe("a cat", num_inference_steps=2, guidance_scale=0.0, height=32, width=32)

    with pytest.raises(IdcraftError, match="SDXL bases"):
        apply_recipe(tiny_sd15_pipeline(), "sdxl-lightning", path)
    with pytest.raises(IdcraftError, match="not a UNet for this base"):
        apply_recipe(tiny_sdxl_pipeline(), "sdxl-lightning", _sd15_unet_file(tmp_path))
    with pytest.raises(IdcraftError, match="not a LoRA|holds a whole UNet"):
        apply_recipe(tiny_sdxl_pipeline(), "lcm-lora", path)


def _sd15_unet_file(tmp_path):
    from safetensors.torch import save_file

    from idcraft.tiny import tiny_sd15_unet

    path = tmp_path / "other_unet.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_sd15_unet().state_dict().items()}, str(path))
    return path
