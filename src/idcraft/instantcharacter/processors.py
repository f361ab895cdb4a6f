"""InstantCharacter's attention on FLUX: every double- and single-stream block reads the subject tokens.

Each FLUX attention layer gets a :class:`SubjectAttnProcessor`, which computes FLUX's joint attention
unchanged and adds, on the image tokens only,

    scale * Attn(RMSNorm_q(Q_img), RMSNorm_k(to_k_ip(c)), to_v_ip(c))

where ``c`` are the subject tokens of the current denoising step. These are the official
``FluxIPAttnProcessor``'s choices, checked line by line against it:

* the query is the layer's own ``to_q`` output for the image tokens, taken *before* FLUX's ``norm_q`` and
  *without* rotary embeddings (the subject tokens have no position), normalised by the adapter's own
  per-head RMSNorm (``norm_ip_q``); keys get ``norm_ip_k``, values no norm;
* ``to_k_ip``/``to_v_ip`` have biases and read the subject tokens at the T5 width (4096);
* double-stream blocks add the result to the image half of the attention output *before* the output
  projection ``to_out`` (so it is projected with the rest); single-stream blocks, which have no output
  projection in the attention, add it to the image positions of the ``[text; image]`` output.

The text/image split and the tokens of the step are shared by all processors of one adapter
(:class:`SubjectState`), set once per transformer call by
:class:`~idcraft.instantcharacter.adapter.InstantCharacterAdapter`. With no tokens or ``scale == 0`` the
branch is skipped and the processor computes exactly what diffusers' ``FluxAttnProcessor`` computes,
operation for operation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn


@dataclass
class SubjectState:
    """What every processor of one adapter needs to know about the current transformer call."""

    tokens: torch.Tensor | None = None  # [B, N, ip_width] subject tokens of this denoising step
    text_len: int = 0  # text tokens in front of the image tokens (single-stream blocks see both)
    scale: float = 1.0


@dataclass(eq=False)
class SubjectCall:
    """One generation's subject, in a context variable for the duration of its pipeline call (each thread
    and asyncio task sees its own, so requests on one loaded pipeline never share it): whose adapter acts
    (``owner``: that adapter's :class:`SubjectState`), the projector's prepared half, the scale, where the
    scheduler's timestep is read, and the tokens of the current step (written by the adapter's hook)."""

    owner: SubjectState
    prepared: torch.Tensor | None
    scale: float = 1.0
    timestep_source: Callable[[], torch.Tensor | None] | None = None
    tokens: torch.Tensor | None = None
    text_len: int = 0
    cached: tuple[object, torch.Tensor] | None = None


_SUBJECT_CALL: ContextVar[SubjectCall | None] = ContextVar("idcraft_subject_call", default=None)


@contextmanager
def subject_call(call: SubjectCall) -> Iterator[SubjectCall]:
    """Run the enclosed transformer calls with ``call``'s subject (see :class:`SubjectCall`)."""
    token = _SUBJECT_CALL.set(call)
    try:
        yield call
    finally:
        _SUBJECT_CALL.reset(token)


def active_subject_call() -> SubjectCall | None:
    return _SUBJECT_CALL.get()


def current_state(state: SubjectState) -> SubjectState | SubjectCall:
    """What the processors of the adapter owning ``state`` read now: the active call when it is this
    adapter's, else the adapter's own state (idle: no tokens)."""
    call = _SUBJECT_CALL.get()
    return call if call is not None and call.owner is state else state


class HeadRMSNorm(nn.Module):
    """The RMSNorm of the official checkpoint (gain named ``scale``): ``scale * x / (rms(x) + eps)``.

    Unlike ``torch.nn.RMSNorm``, ``eps`` is added to the RMS rather than to the mean square and nothing is
    upcast to float32; the official adapter was trained with this variant, so it is kept as it is.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
        return self.scale * (x / (rms + self.eps))


class SubjectAttnProcessor(nn.Module):
    """FLUX attention (double- or single-stream) plus the subject branch; see the module docstring.

    ``width`` is the layer's attention width (heads x head_dim, 3072 for FLUX.1), ``ip_width`` the width
    of the subject tokens (4096) and ``head_dim`` the RMSNorm width (128). Parameters are registered in
    the order the official files list them.
    """

    # Read by diffusers' dispatch_attention_fn; set by `transformer.set_attention_backend(...)`.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, width: int, ip_width: int, head_dim: int, state: SubjectState):
        super().__init__()
        self.norm_ip_q = HeadRMSNorm(head_dim)
        self.to_k_ip = nn.Linear(ip_width, width)
        self.norm_ip_k = HeadRMSNorm(head_dim)
        self.to_v_ip = nn.Linear(ip_width, width)
        self.state = state

    @property
    def width(self) -> int:
        return self.to_k_ip.out_features

    @property
    def ip_width(self) -> int:
        return self.to_k_ip.in_features

    @property
    def head_dim(self) -> int:
        return self.norm_ip_q.scale.shape[0]

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # Single-stream blocks see [text; image]: the subject branch reads the image queries only.
        state = current_state(self.state)
        subject = self._subject_attention(
            attn, query, 0 if encoder_hidden_states is not None else None, state
        )

        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            if getattr(attn, "fused_projections", False):
                enc_q, enc_k, enc_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                enc_q = attn.add_q_proj(encoder_hidden_states)
                enc_k = attn.add_k_proj(encoder_hidden_states)
                enc_v = attn.add_v_proj(encoder_hidden_states)
            enc_q = attn.norm_added_q(enc_q.unflatten(-1, (-1, attn.head_dim)))
            enc_k = attn.norm_added_k(enc_k.unflatten(-1, (-1, attn.head_dim)))
            enc_v = enc_v.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([enc_q, query], dim=1)
            key = torch.cat([enc_k, key], dim=1)
            value = torch.cat([enc_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [text, hidden_states.shape[1] - text], dim=1
            )
            if subject is not None:
                hidden_states = hidden_states + subject * state.scale
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        if subject is not None:
            text = state.text_len
            # Out of place: the attention output is saved for the backward pass (training).
            hidden_states = torch.cat(
                [hidden_states[:, :text], hidden_states[:, text:] + subject * state.scale], dim=1
            )
        return hidden_states

    def _subject_attention(
        self,
        attn: nn.Module,
        query: torch.Tensor,
        text: int | None,
        state: SubjectState | SubjectCall | None = None,
    ) -> torch.Tensor | None:
        """``Attn(norm_ip_q(q_img), norm_ip_k(to_k_ip(c)), to_v_ip(c))`` as ``[B, L_img, width]``, or None
        when the branch is off. ``text`` is how many leading query positions are text (None: read it from
        the shared state, for single-stream blocks)."""
        state = state if state is not None else current_state(self.state)
        tokens = state.tokens
        if tokens is None or state.scale == 0:
            return None
        img_query = query[:, (state.text_len if text is None else text) :]

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, L, H*D] -> [B, H, L, D]
            return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        value = heads(self.to_v_ip(tokens))
        ip_query = self.norm_ip_q(heads(img_query)).to(value.dtype)
        ip_key = self.norm_ip_k(heads(self.to_k_ip(tokens))).to(value.dtype)
        out = F.scaled_dot_product_attention(ip_query, ip_key, value)
        return out.transpose(1, 2).flatten(2).to(img_query.dtype)
