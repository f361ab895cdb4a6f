"""InstantCharacter's projector: SigLIP + DINOv2 features -> subject tokens for every denoising step.

The module is the official ``CrossLayerCrossScaleProjector`` with the same parameter names, so the
checkpoint's ``image_proj`` group loads unchanged (checked against ``shared/formats/instantcharacter_layout.json``):

* **cross-layer**: the low-resolution deep tokens (last layer of both encoders, side by side in width) go
  through ``cross_layer_blocks`` (diffusers ``BasicTransformerBlock``: self-attention, cross-attention to the
  *shallow* tokens of three intermediate layers of each encoder, GEGLU feed-forward), then the MLP
  ``proj_cross_layer``;
* **cross-scale**: the same low-resolution tokens go through ``cross_scale_blocks``, cross-attending to the
  deep tokens of the four 384-pixel tiles of the 768-pixel image, then ``proj_cross_scale``;
* ``proj(low_res_deep) + cross_scale`` and ``cross_layer`` are concatenated along the tokens;
* the **resampler** (:class:`TimeResampler`): learned queries read that sequence through perceiver layers
  whose norms are shifted and scaled by the denoising timestep (adaLN), giving ``num_tokens`` tokens at the
  text width.

Only the resampler depends on the timestep. The official pipeline re-runs the whole projector at every
step; here the two branches run once per generation (:meth:`SubjectProjector.prepare`) and only the
resampler runs per step (:meth:`SubjectProjector.tokens`). The inputs are identical at every step, so the
tokens are the same, at a fraction of the cost (the branches hold 90 % of the projector's weights).

Every width and count comes from the checkpoint's shapes (:meth:`ProjectorConfig.from_state_dict`); the one
thing the files cannot say is the attention head width, 64 in every official module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from ..errors import CheckpointError
from ..projections import PerceiverAttention, _feed_forward

StateDict = dict[str, torch.Tensor]

#: Attention head width of the projector's transformer blocks and of the resampler (official value; the
#: files store only heads x head width).
HEAD_DIM = 64


@dataclass(frozen=True)
class ProjectorConfig:
    """Widths and counts of one projector, as its checkpoint's shapes give them (official values in brackets)."""

    width: int  # feature width: SigLIP + DINOv2 hidden sizes [1152 + 1536 = 2688]
    cross_layer_blocks: int  # [4]
    cross_scale_blocks: int  # [4]
    block_ff_inner: int  # GEGLU inner width of the blocks [4 x 2688]
    mlp_hidden: int  # hidden width of proj / proj_cross_layer / proj_cross_scale [2 x 2688]
    resampler_width: int  # [1280]
    resampler_depth: int  # [4]
    resampler_ff_inner: int  # [4 x 1280]
    num_tokens: int  # subject tokens per step [1024]
    output_width: int  # width of the subject tokens = T5 width [4096]
    timestep_channels: int  # sinusoidal timestep features [320]

    @classmethod
    def official(cls, width: int = 2688, output_width: int = 4096, num_tokens: int = 1024) -> ProjectorConfig:
        """The released InstantCharacter-FLUX projector's shape (the bracketed values above), for encoder
        features of ``width`` and tokens of ``output_width`` (the defaults are the released ones)."""
        return cls(
            width=width,
            cross_layer_blocks=4,
            cross_scale_blocks=4,
            block_ff_inner=4 * width,
            mlp_hidden=2 * width,
            resampler_width=1280,
            resampler_depth=4,
            resampler_ff_inner=4 * 1280,
            num_tokens=num_tokens,
            output_width=output_width,
            timestep_channels=320,
        )

    @classmethod
    def from_state_dict(cls, sd: StateDict) -> ProjectorConfig:
        """Read every width and count from an ``image_proj`` state dict; a clear error if keys are missing."""

        def shape(key: str) -> tuple[int, ...]:
            if key not in sd:
                raise CheckpointError(
                    f"not an InstantCharacter projector: image_proj has no {key!r} (found "
                    f"{', '.join(sorted(sd)[:4])}, ...). Expected the official layout with cross_layer_blocks, "
                    "cross_scale_blocks, proj, proj_cross_layer, proj_cross_scale and resampler."
                )
            return tuple(sd[key].shape)

        def count(prefix: str) -> int:
            found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
            if found != set(range(len(found))):
                raise CheckpointError(f"image_proj {prefix} are numbered {sorted(found)}, expected 0..N-1.")
            return len(found)

        _, num_tokens, resampler_width = shape("resampler.latents")
        config = cls(
            width=shape("cross_layer_blocks.0.norm1.weight")[0],
            cross_layer_blocks=count("cross_layer_blocks"),
            cross_scale_blocks=count("cross_scale_blocks"),
            block_ff_inner=shape("cross_layer_blocks.0.ff.net.2.weight")[1],
            mlp_hidden=shape("proj.fc1.weight")[0],
            resampler_width=resampler_width,
            resampler_depth=count("resampler.layers"),
            resampler_ff_inner=shape("resampler.layers.0.1.1.weight")[0],
            num_tokens=num_tokens,
            output_width=shape("resampler.proj_out.weight")[0],
            timestep_channels=shape("resampler.time_embedding.linear_1.weight")[1],
        )
        if shape("resampler.proj_in.weight")[1] != config.width:
            raise CheckpointError(
                f"image_proj is inconsistent: the resampler reads width {shape('resampler.proj_in.weight')[1]} "
                f"but the blocks work at {config.width}."
            )
        for name, width in (("feature", config.width), ("resampler", config.resampler_width)):
            if width % HEAD_DIM:
                raise CheckpointError(
                    f"image_proj {name} width {width} is not a multiple of the head width {HEAD_DIM}."
                )
        return config


class _Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2: timm's ``Mlp`` as the official projector uses it."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _AdaLayerNorm(nn.LayerNorm):
    """A LayerNorm followed by the timestep's shift and scale, ``x * (1 + scale) + shift`` (adaLN).

    It stands where the perceiver's latent norm and feed-forward norm stand in the plain Resampler, so the
    plain modules (and their parameter names) serve unchanged; :class:`TimeResampler` sets ``shift`` and
    ``scale`` for the current call.
    """

    shift: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.shift is None:
            return x
        return x * (1 + self.scale.unsqueeze(1)) + self.shift.unsqueeze(1)


class TimeResampler(nn.Module):
    """Perceiver resampler conditioned on the denoising timestep (the official ``TimeResampler``).

    ``num_tokens`` learned latents read ``proj_in(features) + temb`` through ``depth`` layers of
    (adaLN-modulated perceiver attention, adaLN-modulated feed-forward); then ``proj_out`` and ``norm_out``.
    ``temb`` is diffusers' sinusoidal ``Timesteps`` (flip_sin_to_cos, shift 0) and ``TimestepEmbedding``.
    """

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        dim = config.resampler_width
        self.latents = nn.Parameter(torch.randn(1, config.num_tokens, dim) / dim**0.5)
        self.proj_in = nn.Linear(config.width, dim)
        self.proj_out = nn.Linear(dim, config.output_width)
        self.norm_out = nn.LayerNorm(config.output_width)
        self.layers = nn.ModuleList()
        for _ in range(config.resampler_depth):
            attn = PerceiverAttention(dim, HEAD_DIM, dim // HEAD_DIM)
            attn.norm2 = _AdaLayerNorm(dim)  # the latents' norm; same place, same parameter names
            ff = _feed_forward(dim, config.resampler_ff_inner / dim)
            ff[0] = _AdaLayerNorm(dim)
            modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim))
            self.layers.append(nn.ModuleList([attn, ff, modulation]))
        self.time_proj = Timesteps(config.timestep_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(config.timestep_channels, dim, act_fn="silu")

    def forward(self, features: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """``features`` ``[B, L, width]``, ``timestep`` (0..1000, as the scheduler gives it) -> ``[B, N, out]``."""
        batch = features.shape[0]
        temb = self.time_proj(timestep.reshape(-1).expand(batch)).to(features.dtype)
        temb = self.time_embedding(temb)
        latents = self.latents.repeat(batch, 1, 1)
        features = self.proj_in(features) + temb[:, None]
        for attn, ff, modulation in self.layers:
            shift_msa, scale_msa, shift_mlp, scale_mlp = modulation(temb).chunk(4, dim=1)
            attn.norm2.shift, attn.norm2.scale = shift_msa, scale_msa
            ff[0].shift, ff[0].scale = shift_mlp, scale_mlp
            try:
                latents = attn(features, latents) + latents
                latents = ff(latents) + latents
            finally:
                attn.norm2.shift = attn.norm2.scale = ff[0].shift = ff[0].scale = None
        return self.norm_out(self.proj_out(latents))


class SubjectProjector(nn.Module):
    """The official ``CrossLayerCrossScaleProjector`` (see the module docstring), split in two calls:
    :meth:`prepare` (once per reference) and :meth:`tokens` (once per denoising step)."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config

        def blocks(count: int) -> nn.ModuleList:
            return nn.ModuleList(
                BasicTransformerBlock(
                    config.width,
                    config.width // HEAD_DIM,
                    HEAD_DIM,
                    dropout=0.0,
                    cross_attention_dim=config.width,
                    activation_fn="geglu",
                    attention_bias=False,
                    norm_type="layer_norm",
                    norm_elementwise_affine=True,
                    norm_eps=1e-6,
                    ff_inner_dim=config.block_ff_inner,
                )
                for _ in range(count)
            )

        self.cross_layer_blocks = blocks(config.cross_layer_blocks)
        self.cross_scale_blocks = blocks(config.cross_scale_blocks)
        self.proj = _Mlp(config.width, config.mlp_hidden)
        self.proj_cross_layer = _Mlp(config.width, config.mlp_hidden)
        self.proj_cross_scale = _Mlp(config.width, config.mlp_hidden)
        self.resampler = TimeResampler(config)

    def prepare(
        self, low_res_shallow: torch.Tensor, low_res_deep: torch.Tensor, high_res_deep: torch.Tensor
    ) -> torch.Tensor:
        """The timestep-independent part: ``[B, 2 x P, width]`` (cross-scale half, then cross-layer half)."""
        cross_layer = low_res_deep
        for block in self.cross_layer_blocks:
            cross_layer = block(cross_layer, encoder_hidden_states=low_res_shallow)
        cross_layer = self.proj_cross_layer(cross_layer)
        cross_scale = low_res_deep
        for block in self.cross_scale_blocks:
            cross_scale = block(cross_scale, encoder_hidden_states=high_res_deep)
        cross_scale = self.proj_cross_scale(cross_scale)
        return torch.cat([self.proj(low_res_deep) + cross_scale, cross_layer], dim=1)

    def tokens(self, prepared: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Subject tokens ``[B, num_tokens, output_width]`` for one denoising step."""
        return self.resampler(prepared, timestep)

    def forward(
        self,
        low_res_shallow: torch.Tensor,
        low_res_deep: torch.Tensor,
        high_res_deep: torch.Tensor,
        timestep: torch.Tensor,
    ) -> torch.Tensor:
        """Both parts at once, as the official module's ``forward`` computes them."""
        return self.tokens(self.prepare(low_res_shallow, low_res_deep, high_res_deep), timestep)

    @property
    def heavy_modules(self) -> list[nn.Module]:
        """The modules only :meth:`prepare` uses (moved to the GPU for that call alone when offloading)."""
        return [
            self.cross_layer_blocks,
            self.cross_scale_blocks,
            self.proj,
            self.proj_cross_layer,
            self.proj_cross_scale,
        ]
