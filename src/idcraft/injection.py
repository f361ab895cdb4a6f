"""Injection: decoupled cross-attention on a diffusers UNet.

Each cross-attention layer (``attn2``) of the UNet gets an :class:`IPAttnProcessor`, which computes

    Z = Attn(Q, K_text, V_text) + scale * Attn(Q, to_k_ip(c), to_v_ip(c))

where ``c`` are the adapter's image tokens. Like the official code, the image tokens travel appended to the
text embeddings (``encoder_hidden_states = [text; image]``): the diffusers pipelines then carry them through
classifier-free guidance and ``num_images_per_prompt`` batching untouched, and the processor splits the last
``num_tokens`` off again. A ControlNet beside the UNet receives the same sequence, so its layers get a
:class:`ControlNetAttnProcessor` that drops the image tokens: the ControlNet sees the text only (or, for
InstantID's IdentityNet, keeps only the image tokens).

IP-Adapter-FaceID adds LoRA (``to_q_lora``, ``to_k_lora``, ``to_v_lora``, ``to_out_lora``) to every
attention layer, self-attention included; the same processor carries it, with or without image weights.

Layer numbering follows ``unet.attn_processors`` order (down blocks, up blocks, mid block; within a
transformer block attn1 then attn2), so cross-attention layers have odd indices: the numbering the
official ``ip_adapter`` state-dict keys use.

**Per-request state.** What one generation needs (the adapter's scale, how many trailing tokens are image
tokens, the regions of several people) is a :class:`CallState` that travels with the call, in a context
variable set by :func:`adapter_call` for the duration of one pipeline call: each thread (and each asyncio
task) sees its own, so requests running at once on one loaded model never see each other's values.
Nothing about a request is written onto the shared modules. The processors on a UNet are
:class:`AdapterRouter` s: several adapters can be attached to one UNet at once, and the active call says
which of them acts (or none: the base model alone). With no active call (training, which runs the UNet
directly) an adapter attached alone acts with its :class:`TokenLayout` defaults.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn


@dataclass
class Region:
    """One identity of a multi-person image: its span of image tokens and where it may act."""

    start: int
    end: int
    mask: torch.Tensor  # [H, W], 1 inside the region, at any resolution with the output's aspect ratio


@dataclass(eq=False)
class TokenLayout:
    """An adapter's identity among the processors it owns, and its *training* defaults: how many trailing
    tokens of ``encoder_hidden_states`` are image tokens when the UNet is called directly with no
    :func:`adapter_call` active (the training loops set it per batch). Generation never writes it: a call's
    values travel in its :class:`CallState`."""

    num_tokens: int = 0
    regions: list[Region] | None = None


@dataclass(frozen=True)
class CallState:
    """The per-request values of one generation, read by every processor during that call.

    ``scale`` weighs the image attention (0: the base model); ``num_tokens`` is how many trailing tokens
    of ``encoder_hidden_states`` are image tokens; ``regions`` places several people; ``lora_scale``
    weighs FaceID's LoRA (1.0 as released)."""

    scale: float = 1.0
    num_tokens: int = 0
    regions: tuple[Region, ...] | None = None
    lora_scale: float = 1.0


@dataclass(frozen=True)
class _ActiveCall:
    layout: TokenLayout | None  # the adapter acting in this call; None: the base model alone
    state: CallState = field(default_factory=CallState)


_ACTIVE: ContextVar[_ActiveCall | None] = ContextVar("idcraft_adapter_call", default=None)


@contextmanager
def adapter_call(layout: TokenLayout | None, state: CallState | None = None) -> Iterator[CallState]:
    """Run the enclosed model calls with the adapter owning ``layout`` acting with ``state`` (``None``:
    the base model alone, whatever is attached). Scoped to the current thread / asyncio task."""
    state = state or CallState()
    token = _ACTIVE.set(_ActiveCall(layout, state))
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


def active_call() -> tuple[TokenLayout | None, CallState] | None:
    """``(layout, state)`` of the call running in this thread/task, or ``None`` outside any call."""
    call = _ACTIVE.get()
    return None if call is None else (call.layout, call.state)


def regional_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, regions: list[Region]
) -> torch.Tensor:
    """Attention where each query position sees only the image tokens of the region it lies in.

    ``query`` ``[B, heads, Q, d]``, ``key``/``value`` ``[B, heads, T, d]`` over all identities' tokens.
    Each identity's attention is computed over its own tokens and kept inside its mask, downsampled
    (nearest) to this layer's token grid; so identities never blend.
    """
    out = torch.zeros_like(query)
    for region in regions:
        part = F.scaled_dot_product_attention(
            query, key[:, :, region.start : region.end], value[:, :, region.start : region.end]
        )
        out = out + part * _mask_at(region.mask, query.shape[2]).to(part.dtype)
    return out


def _mask_at(mask: torch.Tensor, positions: int) -> torch.Tensor:
    """``mask`` resampled to a layer with ``positions`` tokens, as ``[1, 1, positions, 1]``."""
    height, width = mask.shape
    factor = (height * width / positions) ** 0.5
    size = (max(1, round(height / factor)), max(1, round(width / factor)))
    if size[0] * size[1] != positions:
        raise ValueError(f"cannot map a {height}x{width} region mask onto {positions} positions")
    small = F.interpolate(mask[None, None].float(), size=size, mode="nearest")
    return small.to(mask.device).reshape(1, 1, positions, 1)


class LoRALinear(nn.Module):
    """Low-rank update ``up(down(x))`` added to a frozen linear layer's output (parameter names as in the
    official FaceID files: ``down.weight`` ``[rank, in]``, ``up.weight`` ``[out, rank]``)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1 / rank)
        nn.init.zeros_(self.up.weight)  # a fresh LoRA changes nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


class IPAttnProcessor(nn.Module):
    """Attention processor with optional image key/value weights (decoupled cross-attention) and optional
    LoRA on the layer's q/k/v/out projections.

    ``image=True`` needs a cross-attention layer; a self-attention layer of FaceID gets ``image=False`` and
    LoRA only. ``cross_attention_dim`` is the width of ``encoder_hidden_states`` (the layer's own width for
    self-attention).
    """

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int,
        layout: TokenLayout,
        scale: float = 1.0,
        *,
        image: bool = True,
        lora_rank: int | None = None,
    ):
        super().__init__()
        if lora_rank:  # registered first: the official files list a layer's LoRA keys before to_k_ip
            self.to_q_lora = LoRALinear(hidden_size, hidden_size, lora_rank)
            self.to_k_lora = LoRALinear(cross_attention_dim, hidden_size, lora_rank)
            self.to_v_lora = LoRALinear(cross_attention_dim, hidden_size, lora_rank)
            self.to_out_lora = LoRALinear(hidden_size, hidden_size, lora_rank)
        if image:
            self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
            self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.has_image = image
        self.width = hidden_size
        self.lora_rank = lora_rank
        self.lora_scale = 1.0
        self.lora_merged = False  # the LoRA is in the layer's own weights (see IPAdapter.attach)
        self.layout = layout
        self.scale = scale

    def default_state(self) -> CallState:
        """The values used when the UNet is called with no :func:`adapter_call` active (training)."""
        regions = tuple(self.layout.regions) if self.layout.regions else None
        return CallState(self.scale, self.layout.num_tokens, regions, self.lora_scale)

    def _project(self, linear: nn.Module, lora: str, x: torch.Tensor, lora_scale: float) -> torch.Tensor:
        out = linear(x)
        if self.lora_rank and lora_scale != 0 and not self.lora_merged:
            out = out + lora_scale * getattr(self, lora)(x)
        return out

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        state: CallState | None = None,
        **kwargs,
    ) -> torch.Tensor:
        state = state if state is not None else self.default_state()
        lora_scale = state.lora_scale
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)

        text, image = split_image_tokens(
            encoder_hidden_states, state.num_tokens if self.has_image else 0
        )
        batch_size = hidden_states.shape[0] if text is None else text.shape[0]
        sequence_length = hidden_states.shape[1] if text is None else text.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = self._project(attn.to_q, "to_q_lora", hidden_states, lora_scale)
        if text is None:
            text = hidden_states
        elif attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        head_dim = query.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        def merge(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        query_h = heads(query)
        key = self._project(attn.to_k, "to_k_lora", text, lora_scale)
        value = self._project(attn.to_v, "to_v_lora", text, lora_scale)
        hidden_states = F.scaled_dot_product_attention(
            query_h, heads(key), heads(value), attn_mask=attention_mask
        )
        hidden_states = merge(hidden_states)
        if image is not None and image.shape[1] > 0 and state.scale != 0:
            ip_key, ip_value = heads(self.to_k_ip(image)), heads(self.to_v_ip(image))
            if state.regions:
                ip_states = regional_attention(query_h, ip_key, ip_value, list(state.regions))
            else:
                ip_states = F.scaled_dot_product_attention(query_h, ip_key, ip_value)
            hidden_states = hidden_states + state.scale * merge(ip_states)

        hidden_states = attn.to_out[1](self._project(attn.to_out[0], "to_out_lora", hidden_states, lora_scale))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class ControlNetAttnProcessor:
    """Standard attention for a ControlNet beside an adapter, fed only part of ``[text; image]``.

    ``sees="text"``: the text tokens (an ordinary ControlNet next to IP-Adapter, as the official code
    does). ``sees="image"``: the image tokens only (InstantID's IdentityNet, whose cross-attention context
    is the face tokens instead of the prompt).
    """

    def __init__(self, layout: TokenLayout, sees: str = "text"):
        if sees not in ("text", "image"):
            raise ValueError(f"sees must be 'text' or 'image', not {sees!r}")
        self.layout = layout
        self.sees = sees
        self.inner = AttnProcessor2_0()

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, *args, **kwargs
    ):
        if encoder_hidden_states is not None:
            call = active_call()
            # The sequence carries the active call's image tokens, whichever adapter made them.
            state = call[1] if call is not None else CallState(num_tokens=self.layout.num_tokens)
            text, image = split_image_tokens(encoder_hidden_states, state.num_tokens)
            if self.sees == "image" and state.regions:
                return _regional_context_attention(attn, hidden_states, image, list(state.regions))
            encoder_hidden_states = image if self.sees == "image" else text
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


class AdapterRouter(nn.Module):
    """The processor of one attention layer when adapters are attached: it holds each attached adapter's
    processor for this layer and, at every call, lets the adapter of the active :func:`adapter_call` act
    with that call's state. With another adapter's call (or the base model's) active the layer computes
    plain attention; with no call active, a single attached adapter acts with its training defaults.

    A module, so the adapters' weights stay submodules of the UNet (moved, cast and wrapped with it)."""

    def __init__(self, base: object):
        super().__init__()
        self.base = base  # the processor that was in place before any adapter
        self.routes = nn.ModuleDict()  # keyed "0", "1"... in attach order (stable state-dict names)
        self._added = 0

    def add(self, layout: TokenLayout, processor: IPAttnProcessor) -> None:
        """Route calls of the adapter owning ``layout`` (the processor's own) to ``processor``."""
        if processor.layout is not layout:
            raise ValueError("the processor belongs to another adapter's layout")
        self.remove(layout)
        self.routes[str(self._added)] = processor
        self._added += 1

    def remove(self, layout: TokenLayout) -> None:
        for key, processor in list(self.routes.items()):
            if processor.layout is layout:
                del self.routes[key]

    def __len__(self) -> int:
        return len(self.routes)

    def _route(self, layout: TokenLayout | None) -> nn.Module | None:
        return next((p for p in self.routes.values() if p.layout is layout), None)

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
        call = active_call()
        if call is None:
            if len(self.routes) == 1:
                return next(iter(self.routes.values()))(
                    attn, hidden_states, encoder_hidden_states, attention_mask, temb
                )
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        layout, state = call
        processor = self._route(layout)
        if processor is not None:
            return processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, state=state)
        if encoder_hidden_states is not None and attn.is_cross_attention:
            encoder_hidden_states, _ = split_image_tokens(encoder_hidden_states, state.num_tokens)
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _regional_context_attention(
    attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor, regions: list[Region]
) -> torch.Tensor:
    """Cross-attention of a ControlNet (IdentityNet) whose context is several identities' tokens: each
    region attends to its own identity only (transformer-block attention: 3-D input, no norms/masks)."""
    batch = hidden_states.shape[0]
    query = attn.to_q(hidden_states)
    head_dim = query.shape[-1] // attn.heads

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    out = regional_attention(heads(query), heads(attn.to_k(context)), heads(attn.to_v(context)), regions)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor


def split_image_tokens(
    encoder_hidden_states: torch.Tensor | None, num_tokens: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``[text; image]`` -> ``(text, image)``; self-attention (``None``) passes through."""
    if encoder_hidden_states is None or num_tokens == 0:
        return encoder_hidden_states, None
    end = encoder_hidden_states.shape[1] - num_tokens
    return encoder_hidden_states[:, :end], encoder_hidden_states[:, end:]


def attention_layers(model: nn.Module) -> dict[int, str]:
    """``{index in attn_processors order: processor name}`` for every attention layer."""
    return dict(enumerate(model.attn_processors))


def cross_attention_layers(model: nn.Module) -> dict[int, str]:
    """``{index in attn_processors order: processor name}`` for every cross-attention (attn2) layer."""
    return {i: name for i, name in attention_layers(model).items() if not name.endswith("attn1.processor")}


def attention_module(model: nn.Module, processor_name: str) -> Attention:
    """The ``Attention`` module a processor name (``....attn2.processor``) belongs to."""
    return model.get_submodule(processor_name.removesuffix(".processor"))


def install(model: nn.Module, processors: dict[str, object]) -> None:
    """Set the given processors by name, keeping every other layer's current processor."""
    current = dict(model.attn_processors)
    unknown = set(processors) - set(current)
    if unknown:
        raise KeyError(f"no attention layers named {sorted(unknown)[:3]}")
    current.update(processors)
    model.set_attn_processor(current)
