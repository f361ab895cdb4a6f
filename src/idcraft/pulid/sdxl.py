"""PuLID's ID cross-attention on an SDXL UNet (release ``pulid_v1.1.safetensors``).

Every cross-attention layer (``attn2``) gets an :class:`IDAttnProcessor`: text attention as usual, plus
attention from the same queries to the ID tokens (followed by ``num_zero`` zero tokens) through the layer's
``id_to_k`` / ``id_to_v``; the two are combined by one of three rules (``ortho``):

* ``off``: ``text + scale * id``
* ``v1``:  ``text + scale * (id - proj_text(id))`` -- the part of the ID output orthogonal to the text
  output, per channel along the token axis;
* ``v2`` (the official app's default): ``text + scale * (id + (m - 1) * proj_text(id))`` where ``m`` is
  the attention mass (unscaled logits, mean over heads) on the first 5 ID tokens.

Self-attention keeps plain attention. The release stores the weights as
``id_adapter_attn_layers.{k}.id_to_k|id_to_v.weight`` with ``k`` the processor's index in
``unet.attn_processors`` order (attn2 layers have odd ``k``): :class:`IDAttention` keeps that numbering.

**Per-request state.** The ID tokens, scale, zero-token count and ortho rule of a UNet call travel in a
context variable set by :func:`id_call` (one per CFG branch: the negative branch gets the uncond tokens);
each thread/task sees its own, so requests on one loaded UNet never see each other's values. Outside any
call the layers compute plain attention (the base model).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from ..errors import CheckpointError, IdcraftError
from ..injection import cross_attention_layers

ORTHO_MODES = ("off", "v1", "v2")
#: Release prefix of the ID attention weights.
PREFIX = "id_adapter_attn_layers."
#: v2 measures the attention mass on this many leading ID tokens (official constant).
V2_TOKENS = 5


@dataclass(frozen=True)
class IdCall:
    """What the ID layers do during one UNet call: ``tokens`` ``[B, Q, C]`` (``None``: nothing)."""

    tokens: torch.Tensor | None
    scale: float = 0.8
    num_zero: int = 20
    ortho: str = "v2"

    def __post_init__(self) -> None:
        if self.ortho not in ORTHO_MODES:
            raise IdcraftError(f"--ortho must be one of {', '.join(ORTHO_MODES)}, not {self.ortho!r}.")
        if self.num_zero < 0:
            raise IdcraftError(f"--num-zero must be 0 or more, not {self.num_zero}.")


_CALL: ContextVar[IdCall | None] = ContextVar("idcraft_pulid_call", default=None)


@contextmanager
def id_call(call: IdCall | None) -> Iterator[IdCall | None]:
    """Run the enclosed UNet calls with ``call``'s ID tokens and settings (this thread/task only)."""
    token = _CALL.set(call)
    try:
        yield call
    finally:
        _CALL.reset(token)


def _projection(text: torch.Tensor, ident: torch.Tensor) -> torch.Tensor:
    """The component of ``ident`` along ``text``, per channel, over the token axis (float32)."""
    return (text * ident).sum(dim=-2, keepdim=True) / (text * text).sum(dim=-2, keepdim=True) * text


def combine(
    text: torch.Tensor, ident: torch.Tensor, scale: float, ortho: str, mass: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``ortho`` rule (module docstring); ``text``/``ident`` ``[B, N, C]``, ``mass`` ``[B, N, 1]``."""
    if ortho == "off":
        return text + scale * ident
    dtype = text.dtype
    text, ident = text.float(), ident.float()
    projection = _projection(text, ident)
    if ortho == "v1":
        return (text + scale * (ident - projection)).to(dtype)
    return (text + scale * (ident + (mass.float() - 1) * projection)).to(dtype)


class IDAttnProcessor(nn.Module):
    """Cross-attention with PuLID's ID branch (see the module docstring)."""

    def __init__(self, hidden_size: int, id_dim: int):
        super().__init__()
        self.id_to_k = nn.Linear(id_dim, hidden_size, bias=False)
        self.id_to_v = nn.Linear(id_dim, hidden_size, bias=False)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        call = _CALL.get()
        if call is None or call.tokens is None or call.scale == 0:
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length = context.shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        head_dim = query.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        def merge(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        query_h = heads(query)
        text = merge(
            F.scaled_dot_product_attention(
                query_h, heads(attn.to_k(context)), heads(attn.to_v(context)), attn_mask=attention_mask
            )
        )
        tokens = call.tokens.to(query.device, self.id_to_k.weight.dtype)
        if tokens.shape[0] != batch_size:
            tokens = tokens.repeat_interleave(batch_size // tokens.shape[0], dim=0)
        if call.num_zero:
            zeros = tokens.new_zeros(tokens.shape[0], call.num_zero, tokens.shape[-1])
            tokens = torch.cat((tokens, zeros), dim=1)
        id_key = heads(self.id_to_k(tokens).to(query.dtype))
        id_value = heads(self.id_to_v(tokens).to(query.dtype))
        ident = merge(F.scaled_dot_product_attention(query_h, id_key, id_value))
        mass = None
        if call.ortho == "v2":
            weights = (query_h.float() @ id_key.float().transpose(-2, -1)).softmax(dim=-1).mean(dim=1)
            mass = weights[:, :, :V2_TOKENS].sum(dim=-1, keepdim=True)
        hidden_states = combine(text, ident, call.scale, call.ortho, mass)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class IDAttention(nn.Module):
    """The ID processors of one UNet, keyed by their index in ``unet.attn_processors`` order (the release's
    numbering), so ``state_dict()`` has the release's key names under :data:`PREFIX`."""

    def __init__(self, unet: nn.Module, id_dim: int):
        super().__init__()
        self.layers = nn.ModuleDict()
        for index, name in cross_attention_layers(unet).items():
            attn = unet.get_submodule(name.removesuffix(".processor"))
            self.layers[str(index)] = IDAttnProcessor(attn.to_q.out_features, id_dim)
        self.id_dim = id_dim

    def attach(self, unet: nn.Module) -> None:
        """Install the processors (plain attention on every self-attention layer)."""
        names = list(unet.attn_processors)
        processors = {name: AttnProcessor2_0() for name in names}
        for index, processor in self.layers.items():
            processors[names[int(index)]] = processor
        unet.set_attn_processor(processors)

    def release_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}{k}": v for k, v in self.layers.state_dict().items()}

    @classmethod
    def from_release(cls, unet: nn.Module, sd: dict[str, torch.Tensor]) -> IDAttention:
        """Build for ``unet`` with the ID width the file gives and load the release's ID layers strictly;
        a file made for another UNet (other layer count or widths) is a clear error."""
        own = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
        if not own:
            raise CheckpointError(f"the file has no {PREFIX}* tensors: not a PuLID SDXL release.")
        first = next(v for k, v in own.items() if k.endswith("id_to_k.weight"))
        module = cls(unet, first.shape[1]).to(first.dtype)
        indices = sorted({int(m.group(1)) for k in own if (m := re.match(r"(\d+)\.", k))})
        expected = sorted(int(k) for k in module.layers)
        if indices != expected:
            raise CheckpointError(
                f"the PuLID file has ID attention for {len(indices)} layers, this UNet has {len(expected)} "
                "cross-attention layers: the file is for another base model (PuLID v1.1 is for SDXL)."
            )
        try:
            module.layers.load_state_dict(own, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"the PuLID ID attention does not fit this UNet's widths: {exc}") from exc
        return module
