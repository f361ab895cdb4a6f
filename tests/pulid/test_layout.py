"""The real-size pulid_v1.1 layout (from the official constructors on SDXL, meta device) is exactly what
idcraft builds, and every width is read back from the shapes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from idcraft.pulid.idformer import IDFormer
from idcraft.pulid.sdxl import IDAttention

LAYOUT = json.loads(
    (Path(__file__).resolve().parents[1] / "fixtures" / "pulid-layout" / "pulid_v1.1_layout.json").read_text()
)


def test_real_size_layout_matches():
    release = LAYOUT["pulid_v1.1.safetensors"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**LAYOUT["sdxl_unet_config"])
        attention = IDAttention(unet, id_dim=2048)
        idformer = IDFormer()
    ours = {"id_adapter." + k: list(v.shape) for k, v in idformer.state_dict().items()}
    ours |= {k: list(v.shape) for k, v in attention.release_state_dict().items()}
    assert ours == release
    assert len(attention.layers) == 70
    shapes = {
        k[len("id_adapter.") :]: torch.empty(v, device="meta")
        for k, v in release.items()
        if "attn_layers" not in k
    }
    config = IDFormer.config_from_state_dict(shapes)
    assert config == {
        "dim": 1024, "depth": 10, "dim_head": 64, "heads": 16, "num_id_token": 5, "num_queries": 32,
        "output_dim": 2048, "ff_mult": 4.0, "id_dim": 1280, "vit_dim": 1024, "mapping_dim": 1024, "num_scales": 5,
    }  # fmt: skip
