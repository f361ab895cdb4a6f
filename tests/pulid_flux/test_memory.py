"""The memory estimate before loading: PuLID's parts counted from the release header and placed by offload
mode; a run that cannot fit stops with what would."""

from __future__ import annotations

import pytest
import torch

from idcraft.errors import IdcraftError
from idcraft.instantcharacter.memory import GiB, ParamCount
from idcraft.pulid.flux_memory import PulidFluxMemory, estimate_memory, release_params

from .conftest import CASE


def test_release_params_and_summary(saved, release_tensors):
    params = release_params(saved / "pulid_flux.safetensors")
    encoder = sum(t.numel() for k, t in release_tensors.items() if k.startswith("pulid_encoder."))
    attention = sum(t.numel() for k, t in release_tensors.items() if k.startswith("pulid_ca."))
    assert params["id_encoder"].total == encoder and params["id_attention"].total == attention
    estimate = estimate_memory(
        CASE / "base", saved / "pulid_flux.safetensors", device=torch.device("cpu"), dtype=torch.float32
    )
    text = estimate.summary()
    assert "IDFormer" in text and "ID cross-attention" in text and "FLUX transformer" in text
    assert (
        estimate_memory(
            "black-forest-labs/FLUX.1-dev",
            saved / "pulid_flux.safetensors",
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
        is None
    )


def test_offload_modes_place_the_parts():
    params = {
        "transformer": ParamCount(12_000_000_000, 100_000_000),
        "text_encoder_2": ParamCount(4_800_000_000, 50_000_000),
        "text_encoder": ParamCount(123_000_000, 1_000_000),
        "vae": ParamCount(84_000_000, 1_000_000),
        "id_encoder": ParamCount(200_000_000, 5_000_000),
        "id_attention": ParamCount(420_000_000, 6_000_000),
        "eva_clip": ParamCount(304_000_000, 1_000_000),
    }
    cuda = torch.device("cuda")
    sizes = {
        mode: PulidFluxMemory(params, torch.bfloat16, cuda, mode, 0).gpu_bytes
        for mode in ("none", "model", "sequential")
    }
    assert sizes["none"] > sizes["model"] > sizes["sequential"]
    # model offload: the transformer at a time, the ID attention always there
    assert sizes["model"] >= (12_000_000_000 + 420_000_000) * 2
    tight = PulidFluxMemory(params, torch.bfloat16, cuda, "none", 0, gpu_free=24 * GiB, ram_free=None)
    tight.alternatives = {m: s for m, s in sizes.items()}
    with pytest.raises(IdcraftError, match="--offload model"):
        tight.check()
