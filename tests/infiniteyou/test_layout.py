"""The released layout at real size (docs/formats/infiniteyou_layout.json): idcraft reads its widths from
the shapes, checks it against FLUX.1, and training from scratch writes exactly these keys and shapes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LAYOUT = Path(__file__).resolve().parents[2] / "docs" / "formats" / "infiniteyou_layout.json"
FLUX1 = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def _meta(shapes: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v["shape"], device="meta") for k, v in shapes.items()}


def test_released_layout_loads_checks_and_is_what_training_writes():
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    from idcraft.infiniteyou.fresh import fresh_models
    from idcraft.infiniteyou.pipeline import check_compatible
    from idcraft.projections import Resampler

    layout = json.loads(LAYOUT.read_text())
    image_proj = _meta(layout["image_proj_model.bin"]["image_proj"])
    config = Resampler.config_from_state_dict(image_proj)
    assert config == {
        "dim": 1280, "depth": 4, "dim_head": 64, "heads": 20, "embed_dim": 512, "output_dim": 4096,
        "ff_mult": 4.0, "num_queries": 8,
    }  # fmt: skip
    with torch.device("meta"):
        resampler = Resampler(**config)
        net = FluxControlNetModel(**layout["InfuseNetModel"]["config"])
        transformer = FluxTransformer2DModel(**FLUX1)
        fresh_net, fresh_resampler = fresh_models(transformer)
    resampler.load_state_dict(image_proj, strict=True, assign=True)
    tensors = layout["InfuseNetModel"]["tensors"]
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == {
        k: v["shape"] for k, v in tensors.items()
    }
    check_compatible(net, resampler, transformer)
    assert {k: list(v.shape) for k, v in fresh_net.state_dict().items()} == {
        k: v["shape"] for k, v in tensors.items()
    }
    assert {k: list(v.shape) for k, v in fresh_resampler.state_dict().items()} == {
        k: list(v.shape) for k, v in image_proj.items()
    }
