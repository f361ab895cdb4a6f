"""Files idcraft saves load in diffusers' own ``load_ip_adapter`` and give the same images there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idcraft.checkpoints import save_checkpoint
from idcraft.pipeline import IPAdapterPipeline
from idcraft.tiny import random_adapter


@pytest.mark.parametrize(
    "base, method, suffix",
    [
        ("sd15", "ip-adapter", ".bin"),
        ("sd15", "ip-adapter-plus", ".safetensors"),
        ("sd15", "ip-adapter-full-face", ".bin"),
        ("sdxl", "ip-adapter", ".safetensors"),
        ("sdxl", "ip-adapter-plus", ".bin"),
    ],
)
def test_saved_adapter_runs_in_diffusers(request, encoder, reference_image, tmp_path, base, method, suffix):
    sd15 = request.getfixturevalue(base)
    adapter = random_adapter(sd15.unet, method, encoder.model, seed=3)
    save_checkpoint(adapter.to_checkpoint(), tmp_path / f"adapter{suffix}")
    encoder.model.save_pretrained(tmp_path / "image_encoder")
    settings = dict(num_inference_steps=2, guidance_scale=5.0, width=64, height=64)
    sd15.set_progress_bar_config(disable=True)

    ours = IPAdapterPipeline(sd15, adapter, encoder)
    mine = ours(
        "a red ball",
        reference_image,
        negative_prompt="blurry",
        scale=0.8,
        seed=11,
        steps=2,
        guidance=5.0,
        width=64,
        height=64,
        progress=False,
    )[0]
    ours.adapter.detach()

    sd15.load_ip_adapter(
        str(tmp_path), subfolder="", weight_name=f"adapter{suffix}", image_encoder_folder="image_encoder"
    )
    sd15.set_ip_adapter_scale(0.8)
    theirs = sd15(
        "a red ball",
        negative_prompt="blurry",
        ip_adapter_image=reference_image,
        generator=torch.Generator("cpu").manual_seed(11),
        **settings,
    ).images[0]
    diff = np.abs(np.asarray(mine, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
    assert diff.max() <= 2, diff.max()
