"""Projections: image-encoder features -> extra context tokens for cross-attention.

Three families, each the module an official IP-Adapter checkpoint's ``image_proj`` group was saved from,
with the same parameter names, so the official state dict loads with ``load_state_dict`` unchanged:

* :class:`LinearProjection` (official ``ImageProjModel``): one pooled embedding -> ``num_tokens`` tokens.
* :class:`MLPProjection` (official ``MLPProjModel``, IP-Adapter-Full-face): every CLIP patch token ->
  one context token through a two-layer MLP.
* :class:`Resampler` (the Perceiver Resampler of IP-Adapter-Plus and InstantID): learned query latents
  cross-attend to the encoder's token sequence.
* :class:`FaceIDProjection` (official FaceID ``MLPProjModel``): a 512-d identity embedding -> 4 tokens
  (16 for FaceID-Portrait) through a two-layer MLP.
* :class:`FaceIDPlusProjection` (official ``ProjPlusModel``): the identity tokens above become the queries
  of a Perceiver over CLIP features of the aligned face crop; PlusV2 adds them back ("shortcut").

Each is a diffusers ``ModelMixin``/``ConfigMixin`` and has ``config_from_state_dict``, which reads every
width and count from the tensors' shapes: the file decides, nothing is hard-coded per variant.
"""

from __future__ import annotations

import math
import re

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .errors import CheckpointError

StateDict = dict[str, torch.Tensor]


class LinearProjection(ModelMixin, ConfigMixin):
    """Pooled image embedding ``[B, embed_dim]`` -> ``[B, num_tokens, cross_attention_dim]``."""

    @register_to_config
    def __init__(self, embed_dim: int = 1024, cross_attention_dim: int = 768, num_tokens: int = 4):
        super().__init__()
        self.proj = nn.Linear(embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).reshape(-1, self.config.num_tokens, self.config.cross_attention_dim)
        return self.norm(tokens)

    @staticmethod
    def config_from_state_dict(sd: StateDict) -> dict:
        cross = sd["norm.weight"].shape[0]
        out, embed = sd["proj.weight"].shape
        if out % cross:
            raise CheckpointError(
                f"proj.weight has {out} outputs, not a multiple of the token width {cross}."
            )
        return {"embed_dim": embed, "cross_attention_dim": cross, "num_tokens": out // cross}


class MLPProjection(ModelMixin, ConfigMixin):
    """CLIP hidden states ``[B, N, embed_dim]`` -> ``[B, N, cross_attention_dim]`` (one token per patch)."""

    @register_to_config
    def __init__(self, embed_dim: int = 1280, cross_attention_dim: int = 768):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(embed_dim, embed_dim),
            nn.GELU(),
            nn.Linear(embed_dim, cross_attention_dim),
            nn.LayerNorm(cross_attention_dim),
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(image_embeds)

    @staticmethod
    def config_from_state_dict(sd: StateDict) -> dict:
        return {
            "embed_dim": sd["proj.0.weight"].shape[1],
            "cross_attention_dim": sd["proj.2.weight"].shape[0],
        }


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


class PerceiverAttention(nn.Module):
    """Latents attend to ``[features; latents]`` (keys and values include the latents themselves)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.dim_head = dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features = self.norm1(features)
        latents = self.norm2(latents)
        batch, length, _ = latents.shape
        q = _split_heads(self.to_q(latents), self.heads)
        k, v = self.to_kv(torch.cat((features, latents), dim=-2)).chunk(2, dim=-1)
        k, v = _split_heads(k, self.heads), _split_heads(v, self.heads)
        # Scale q and k by dim_head^-1/4 each before the product, as the reference does (fp16-stable);
        # softmax in float32.
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(batch, length, -1)
        return self.to_out(out)


def _feed_forward(dim: int, mult: float) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class PerceiverStack(nn.Module):
    """``depth`` x (cross-attention from latents to ``[features; latents]`` + feed-forward), then an output
    projection and LayerNorm. The latents are given by the caller: learned queries (Resampler) or identity
    tokens (FaceID-Plus)."""

    def __init__(
        self, dim: int, depth: int, dim_head: int, heads: int, embed_dim: int, output_dim: int, ff_mult: float
    ):
        super().__init__()
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(features)
        for attn, ff in self.layers:
            latents = attn(features, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))

    #: Width of one attention head. Every official perceiver (IP-Adapter-Plus SD1.5/SDXL, FaceID-Plus,
    #: InstantID) uses 64; the files store only heads*dim_head, so this is the one assumption made.
    DIM_HEAD = 64

    @classmethod
    def config_from_state_dict(cls, sd: StateDict, prefix: str = "") -> dict:
        dim = sd[prefix + "proj_in.weight"].shape[0]
        depth = 1 + max(
            int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k))
        )
        inner = sd[prefix + "layers.0.0.to_q.weight"].shape[0]
        ff_inner = sd[prefix + "layers.0.1.1.weight"].shape[0]
        if inner % cls.DIM_HEAD:
            raise CheckpointError(f"perceiver attention width {inner} is not a multiple of {cls.DIM_HEAD}.")
        return {
            "dim": dim,
            "depth": depth,
            "dim_head": cls.DIM_HEAD,
            "heads": inner // cls.DIM_HEAD,
            "embed_dim": sd[prefix + "proj_in.weight"].shape[1],
            "output_dim": sd[prefix + "proj_out.weight"].shape[0],
            "ff_mult": ff_inner / dim,
        }


class Resampler(PerceiverStack, ModelMixin, ConfigMixin):
    """Perceiver Resampler: ``num_queries`` learned latents read the encoder tokens through ``depth`` layers.

    Input ``[B, N, embed_dim]`` (CLIP penultimate hidden states for IP-Adapter-Plus, a 512-d face embedding
    as one token for InstantID), output ``[B, num_queries, output_dim]``.
    """

    @register_to_config
    def __init__(
        self,
        dim: int = 768,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 12,
        num_queries: int = 16,
        embed_dim: int = 1280,
        output_dim: int = 768,
        ff_mult: float = 4,
    ):
        super().__init__(dim, depth, dim_head, heads, embed_dim, output_dim, ff_mult)
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 2:  # one embedding per image (InstantID's face embedding) is one token
            features = features[:, None]
        return super().forward(self.latents.repeat(features.size(0), 1, 1), features)

    @staticmethod
    def config_from_state_dict(sd: StateDict) -> dict:
        _, num_queries, _ = sd["latents"].shape
        return PerceiverStack.config_from_state_dict(sd) | {"num_queries": num_queries}


class _IdentityMLP:
    """The part FaceID and FaceID-Plus share: identity embedding -> ``num_tokens`` tokens (MLP + LayerNorm)."""

    def _build_identity_mlp(self, embed_dim: int, hidden_dim: int, cross_attention_dim: int, num_tokens: int):
        self.proj = nn.Sequential(
            nn.Linear(embed_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, cross_attention_dim * num_tokens),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)

    def identity_tokens(self, id_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(id_embeds).reshape(-1, self.config.num_tokens, self.config.cross_attention_dim)
        return self.norm(tokens)


class FaceIDProjection(_IdentityMLP, ModelMixin, ConfigMixin):
    """Identity embedding ``[B, id_dim]`` -> ``[B, num_tokens, cross_attention_dim]`` (MLP + LayerNorm)."""

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 512,
        hidden_dim: int = 1024,
        cross_attention_dim: int = 768,
        num_tokens: int = 4,
    ):
        super().__init__()
        self._build_identity_mlp(embed_dim, hidden_dim, cross_attention_dim, num_tokens)

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        return self.identity_tokens(id_embeds)

    @staticmethod
    def config_from_state_dict(sd: StateDict) -> dict:
        cross = sd["norm.weight"].shape[0]
        hidden, embed = sd["proj.0.weight"].shape
        out = sd["proj.2.weight"].shape[0]
        if out % cross:
            raise CheckpointError(
                f"proj.2.weight has {out} outputs, not a multiple of the token width {cross}."
            )
        return {
            "embed_dim": embed,
            "hidden_dim": hidden,
            "cross_attention_dim": cross,
            "num_tokens": out // cross,
        }


class FaceIDPlusProjection(_IdentityMLP, ModelMixin, ConfigMixin):
    """FaceID-Plus: identity tokens query the CLIP features of the aligned face crop.

    ``forward(id_embeds, clip_features, shortcut, s_scale)``: with ``shortcut`` (PlusV2) the identity
    tokens are added back, ``id_tokens + s_scale * perceiver(...)``, so ``s_scale`` weighs the CLIP face
    structure against the pure identity.
    """

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 512,
        hidden_dim: int = 1024,
        cross_attention_dim: int = 768,
        num_tokens: int = 4,
        clip_embed_dim: int = 1280,
        depth: int = 4,
        heads: int = 12,
        dim_head: int = 64,
        ff_mult: float = 4,
    ):
        super().__init__()
        self._build_identity_mlp(embed_dim, hidden_dim, cross_attention_dim, num_tokens)
        self.perceiver_resampler = PerceiverStack(
            cross_attention_dim, depth, dim_head, heads, clip_embed_dim, cross_attention_dim, ff_mult
        )

    def forward(
        self,
        id_embeds: torch.Tensor,
        clip_features: torch.Tensor,
        shortcut: bool = False,
        s_scale: float = 1.0,
    ) -> torch.Tensor:
        x = self.identity_tokens(id_embeds)
        out = self.perceiver_resampler(x, clip_features)
        return x + s_scale * out if shortcut else out

    @staticmethod
    def config_from_state_dict(sd: StateDict) -> dict:
        mlp = FaceIDProjection.config_from_state_dict(sd)
        perceiver = PerceiverStack.config_from_state_dict(sd, prefix="perceiver_resampler.")
        return mlp | {
            "clip_embed_dim": perceiver["embed_dim"],
            "depth": perceiver["depth"],
            "heads": perceiver["heads"],
            "dim_head": perceiver["dim_head"],
            "ff_mult": perceiver["ff_mult"],
        }


def projection_from_state_dict(kind: str, sd: StateDict) -> nn.Module:
    """Build the projection ``kind`` with the widths ``sd`` implies and load ``sd`` into it (strictly)."""
    cls = PROJECTIONS[kind]
    try:
        model = cls(**cls.config_from_state_dict(sd))
    except KeyError as exc:
        raise CheckpointError(f"image_proj has no {exc.args[0]!r}: not a {kind} projection.") from exc
    model = nn.Module.to(model, next(iter(sd.values())).dtype)  # plain cast: ModelMixin.to() warns needlessly
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # a shape that contradicts the ones the config was read from
        raise CheckpointError(f"image_proj tensors are inconsistent with each other: {exc}") from exc
    if missing or unexpected:
        raise CheckpointError(
            f"image_proj does not match a {kind} projection: missing {sorted(missing)[:6]}, "
            f"unexpected {sorted(unexpected)[:6]}."
        )
    return model


PROJECTIONS: dict[str, type[nn.Module]] = {
    "linear": LinearProjection,
    "mlp": MLPProjection,
    "resampler": Resampler,
    "faceid-mlp": FaceIDProjection,
    "faceid-plus": FaceIDPlusProjection,
}
