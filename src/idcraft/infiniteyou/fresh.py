"""A fresh InfuseNet and identity Resampler for a FLUX transformer, as training from scratch starts.

InfuseNet starts as diffusers' ``FluxControlNetModel.from_transformer`` makes a FLUX ControlNet: the
embedders and the first ``double`` / ``single`` blocks copied from the base, the control-latent embedder
and every output projection zero (so the untrained branch adds exactly nothing). The Resampler has the
official shape (width 1280, depth 4, 20 heads of 64, 8 queries, ff x4) reading a 512-d embedding and
making tokens of the transformer's text width (T5's 4096 for FLUX.1), which InfuseNet reads as its text.
"""

from __future__ import annotations

from typing import Any

from torch import nn

#: The released InfuseNet's depth (InfiniteYou-FLUX v1.0).
OFFICIAL_DOUBLE = 4
OFFICIAL_SINGLE = 10
#: The released Resampler's shape (everything but the output width, which is the transformer's).
OFFICIAL_RESAMPLER = {"dim": 1280, "depth": 4, "dim_head": 64, "heads": 20, "num_queries": 8, "ff_mult": 4}


def fresh_models(
    transformer: nn.Module,
    *,
    double: int = OFFICIAL_DOUBLE,
    single: int = OFFICIAL_SINGLE,
    resampler: dict[str, Any] | None = None,
    embed_dim: int = 512,
) -> tuple[nn.Module, nn.Module]:
    """``(infusenet, resampler)`` for ``transformer``; ``resampler`` overrides the official shape."""
    from diffusers import FluxControlNetModel

    from ..projections import Resampler

    config = transformer.config
    net = FluxControlNetModel.from_transformer(
        transformer,
        num_layers=min(double, config.num_layers),
        num_single_layers=min(single, config.num_single_layers),
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
    )
    shape = {**OFFICIAL_RESAMPLER, **(resampler or {})}
    projector = Resampler(embed_dim=embed_dim, output_dim=config.joint_attention_dim, **shape)
    return net, projector
