"""Gradient checkpointing that recomputes a block in the context its forward ran in.

Adapters pass their per-call values (ID tokens, scales) to the attention processors in context variables
(:func:`idcraft.injection.adapter_call`, :func:`idcraft.pulid.sdxl.id_call`, ...), set around the denoiser's
forward. ``torch.utils.checkpoint`` recomputes a checkpointed block during ``backward()``, after that forward
has returned and the variables are reset: the block would be recomputed without the adapter, and torch
stops with "a different number of tensors was saved" (or, where the shapes happen to agree, gets wrong
gradients). Running the block, and its recomputation, inside a copy of the forward's context fixes that.
"""

from __future__ import annotations

import contextvars

from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_in_context(module: nn.Module, *args):
    """diffusers' ``gradient_checkpointing_func``: ``module(*args)`` checkpointed (non-reentrant), its
    recomputation run in the context variables of the original call."""
    context = contextvars.copy_context()

    def run(*inputs):
        return context.run(module.__call__, *inputs)

    return checkpoint(run, *args, use_reentrant=False)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Checkpoint ``model``'s blocks (a diffusers ``ModelMixin``) with :func:`checkpoint_in_context`."""
    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_in_context)


__all__ = ["checkpoint_in_context", "enable_gradient_checkpointing"]
