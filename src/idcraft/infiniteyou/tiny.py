"""Tiny random-weight InfiniteYou parts for tests: an InfuseNet and an identity Resampler at the tiny FLUX
widths of :mod:`idcraft.instantcharacter.tiny`, with weights large enough that identity and control image
visibly change the output (diffusers zero-initialises a ControlNet's output blocks)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..instantcharacter.tiny import T5_WIDTH, tiny_flux_pipeline
from ..tiny import TEXT_WIDTH

__all__ = ["tiny_flux_pipeline", "tiny_infusenet", "tiny_resampler", "save_tiny_release"]


def tiny_infusenet(seed: int = 0, double: int = 2, single: int = 3, std: float = 0.2):
    """A ``FluxControlNetModel`` shaped like the tiny FLUX transformer, every weight random."""
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    net = FluxControlNetModel(
        patch_size=1,
        in_channels=16,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return net.eval()


def tiny_resampler(seed: int = 0, embed_dim: int = 512):
    """The official identity Resampler's structure (heads of 64, 8 queries) at width 64, output T5_WIDTH."""
    from ..projections import Resampler

    torch.manual_seed(seed)
    resampler = Resampler(
        dim=64,
        depth=2,
        dim_head=64,
        heads=1,
        num_queries=8,
        embed_dim=embed_dim,
        output_dim=T5_WIDTH,
        ff_mult=4,
    )
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, param in resampler.named_parameters():
            if "norm" not in name and param.ndim > 1:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    return resampler.eval()


def save_tiny_release(folder: str | Path, seed: int = 0, double: int = 2, single: int = 3) -> Path:
    """Write a tiny release folder (``InfuseNetModel/`` + ``image_proj_model.bin``)."""
    from .release import save_release

    return save_release(folder, tiny_infusenet(seed, double, single), tiny_resampler(seed))
