"""FLUX LoRAs (the release's realism / anti-blur ones) go through diffusers' LoRA loader and change the
image; a file that is not a LoRA is a one-line error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idcraft.errors import IdcraftError

from .conftest import CASE, request_for


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(CASE / "base", subfolder="transformer")
    transformer.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "proj_mlp", "proj_out"],
        )
    )
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 2.0)
    folder = tmp_path_factory.mktemp("lora")
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_loads_and_acts(lora_file, case_args, iyou_engine):
    from idcraft.engine import Engine

    engine = Engine.from_pretrained(
        CASE / "base", CASE / "release", method="infiniteyou", device="cpu", loras=[(str(lora_file), 1.0)]
    )
    request = request_for(case_args["control"], steps=2)
    with_lora = np.asarray(engine.generate(request).images[0], dtype=np.int16)
    without = np.asarray(iyou_engine.generate(request).images[0], dtype=np.int16)
    assert np.abs(with_lora - without).mean() > 0.3  # the same request without the LoRA: exactly equal


def test_not_a_lora(tmp_path):
    from idcraft.engine import Engine

    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(IdcraftError, match="--lora .*not a FLUX LoRA"):
        Engine.from_pretrained(
            CASE / "base", CASE / "release", method="infiniteyou", device="cpu", loras=[(str(bad), 1.0)]
        )
