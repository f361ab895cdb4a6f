"""IDFormer: PuLID's identity encoder head (identity embedding + EVA-CLIP hidden states -> ID tokens).

A Perceiver whose latents are ``num_queries`` learned queries followed by ``num_id_token`` tokens made from
the identity vector (ArcFace raw 512 ++ normalised EVA class token). The ``num_scales`` (5) EVA hidden
states enter in order, each through its own MLP, and each is read by ``depth / num_scales`` layers. Only the
first ``num_queries`` latents leave, through a bare ``proj_out`` matrix.

The parameter names are the official ones (``id_adapter.*`` in ``pulid_v1.1.safetensors``,
``pulid_encoder.*`` in ``pulid_flux_v0.9.x``), so a release loads with a strict key match, and every width
comes from the tensors' shapes (:meth:`IDFormer.config_from_state_dict`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import CheckpointError
from ..projections import PerceiverAttention, _feed_forward

StateDict = dict[str, torch.Tensor]

#: Width of one attention head in every released IDFormer (the file stores heads*dim_head only).
DIM_HEAD = 64
#: The prefixes a release stores the IDFormer under: SDXL v1.1, FLUX v0.9.x.
PREFIXES = ("id_adapter.", "pulid_encoder.")


def _mapping(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear-LN-LeakyReLU twice, then Linear (indices 0..6 as in the release)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, out_dim),
    )


class IDFormer(ModelMixin, ConfigMixin):
    """``forward(id_cond, vit_hidden)``: ``id_cond`` ``[B, id_dim]`` (one face) or ``[B, F, id_dim]``
    (``F`` faces, their tokens concatenated as official), ``vit_hidden`` ``num_scales`` tensors
    ``[B, F*T, vit_dim]`` -> ID tokens ``[B, num_queries, output_dim]``."""

    @register_to_config
    def __init__(
        self,
        dim: int = 1024,
        depth: int = 10,
        dim_head: int = DIM_HEAD,
        heads: int = 16,
        num_id_token: int = 5,
        num_queries: int = 32,
        output_dim: int = 2048,
        ff_mult: float = 4,
        id_dim: int = 1280,
        vit_dim: int = 1024,
        mapping_dim: int = 1024,
        num_scales: int = 5,
    ):
        super().__init__()
        if depth % num_scales:
            raise CheckpointError(f"IDFormer depth {depth} is not a multiple of its {num_scales} scales.")
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) * dim**-0.5)
        self.proj_out = nn.Parameter(torch.randn(dim, output_dim) * dim**-0.5)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        for i in range(num_scales):
            setattr(self, f"mapping_{i}", _mapping(vit_dim, mapping_dim, dim))
        self.id_embedding_mapping = _mapping(id_dim, mapping_dim, dim * num_id_token)

    def forward(self, id_cond: torch.Tensor, vit_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        if len(vit_hidden) != cfg.num_scales:
            raise ValueError(f"IDFormer takes {cfg.num_scales} EVA hidden states, got {len(vit_hidden)}.")
        faces = id_cond.shape[1] if id_cond.ndim == 3 else 1
        batch = id_cond.shape[0]
        latents = self.latents.repeat(batch, 1, 1)
        id_tokens = self.id_embedding_mapping(id_cond).reshape(batch, cfg.num_id_token * faces, cfg.dim)
        latents = torch.cat((latents, id_tokens), dim=1)
        per_scale = cfg.depth // cfg.num_scales
        for i, hidden in enumerate(vit_hidden):
            context = torch.cat((id_tokens, getattr(self, f"mapping_{i}")(hidden)), dim=1)
            for attn, ff in self.layers[i * per_scale : (i + 1) * per_scale]:
                latents = attn(context, latents) + latents
                latents = ff(latents) + latents
        return latents[:, : cfg.num_queries] @ self.proj_out

    @staticmethod
    def config_from_state_dict(sd: StateDict) -> dict:
        """Every width and count from the tensors' shapes (head width :data:`DIM_HEAD`)."""
        try:
            _, num_queries, dim = sd["latents"].shape
            output_dim = sd["proj_out"].shape[1]
            depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
            num_scales = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"mapping_(\d+)\.", k)))
            inner = sd["layers.0.0.to_q.weight"].shape[0]
            ff_inner = sd["layers.0.1.1.weight"].shape[0]
            mapping_dim, id_dim = sd["id_embedding_mapping.0.weight"].shape
            id_out = sd["id_embedding_mapping.6.weight"].shape[0]
            vit_dim = sd["mapping_0.0.weight"].shape[1]
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"not a PuLID IDFormer state dict (missing or odd {exc}).") from exc
        if inner % DIM_HEAD or id_out % dim:
            raise CheckpointError(
                f"IDFormer widths do not fit: attention {inner} (heads of {DIM_HEAD}), ID mapping {id_out} "
                f"for token width {dim}."
            )
        return {
            "dim": dim,
            "depth": depth,
            "dim_head": DIM_HEAD,
            "heads": inner // DIM_HEAD,
            "num_id_token": id_out // dim,
            "num_queries": num_queries,
            "output_dim": output_dim,
            "ff_mult": ff_inner / dim,
            "id_dim": id_dim,
            "vit_dim": vit_dim,
            "mapping_dim": mapping_dim,
            "num_scales": num_scales,
        }

    @classmethod
    def from_state_dict(cls, sd: StateDict, prefix: str = "") -> IDFormer:
        """Build with the widths ``sd`` implies and load it with a strict key match.

        ``prefix`` selects a group of a whole release (``"id_adapter."`` or ``"pulid_encoder."``); keys
        outside it are ignored."""
        if prefix:
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            if not sd:
                raise CheckpointError(f"the file has no {prefix}* tensors: not a PuLID release.")
        model = cls(**cls.config_from_state_dict(sd))
        model = nn.Module.to(model, next(iter(sd.values())).dtype)
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(f"IDFormer tensors are inconsistent with each other: {exc}") from exc
        if missing or unexpected:
            raise CheckpointError(
                f"not a PuLID IDFormer: missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}."
            )
        return model

    def uncond_tokens(self, id_cond: torch.Tensor, vit_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """The negative branch's tokens, as official: the IDFormer of zeros shaped like ONE face's inputs
        (not zero tokens)."""
        one_cond = id_cond[:, 0] if id_cond.ndim == 3 else id_cond
        faces = id_cond.shape[1] if id_cond.ndim == 3 else 1
        one_hidden = [h[:, : h.shape[1] // faces] for h in vit_hidden]
        return self(torch.zeros_like(one_cond), [torch.zeros_like(h) for h in one_hidden])
