"""The FLUX.1 base every FLUX family runs on (InstantCharacter, InfiniteYou, PuLID-FLUX): recognising a
FLUX pipeline folder, its dtype, loading it one component at a time, and the offload modes.

Offloading keeps the big FLUX components in RAM and moves them to the GPU for their turn (diffusers'
model/sequential CPU offload); a family's own modules (encoders, projectors) visit the GPU with
:func:`visiting` for the moment they run.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .errors import IdcraftError
from .models import _unreachable, meta_model, resolve_dtype

OFFLOAD_MODES = ("none", "model", "sequential")
#: Components of a FLUX pipeline folder that hold weights.
FLUX_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")


def flux_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"`` -> bfloat16 on an accelerator (FLUX's own dtype; float16 overflows in it),
    float32 on the CPU; anything else as :func:`idcraft.models.resolve_dtype` reads it."""
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return resolve_dtype(dtype, device)


def is_flux_base(base: str | os.PathLike) -> bool:
    """Whether ``base`` is a local diffusers FLUX pipeline folder (``model_index.json`` says so)."""
    index = Path(base) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return str(json.loads(index.read_text()).get("_class_name", "")).startswith("Flux")
    except (OSError, ValueError):
        return False


def flux_index(base: str | os.PathLike, method: str = "this method") -> dict:
    """The ``model_index.json`` of ``base``, which must be a FLUX pipeline (a clear error naming ``method``
    otherwise)."""
    from diffusers import FluxPipeline

    try:
        index = FluxPipeline.load_config(str(base))
    except Exception as exc:  # diffusers raises OSError, EnvironmentError or hub errors
        raise _unreachable("base model", str(base), exc) from exc
    if not str(index.get("_class_name", "")).startswith("Flux"):
        raise IdcraftError(
            f"base model {base} is a {index.get('_class_name', '?')}; {method} runs on FLUX.1 "
            "(a FluxPipeline folder such as black-forest-labs/FLUX.1-dev)."
        )
    return index


def load_flux_pipeline(base: str | os.PathLike, *, dtype: torch.dtype, device: torch.device):
    """Load a ``FluxPipeline`` one component at a time, each moved to ``device`` before the next is read,
    so that RAM holds at most one component (not the whole 33 GB pipeline) on its way to the GPU."""
    from diffusers import FluxPipeline

    index = flux_index(base)
    components = {}
    try:
        for name in FLUX_COMPONENTS:
            library, class_name = index[name]
            cls = getattr(importlib.import_module(library), class_name)
            kwargs = {"torch_dtype": dtype} if library == "diffusers" else {"dtype": dtype}
            model = cls.from_pretrained(str(base), subfolder=name, **kwargs)
            components[name] = model.to(device=device, dtype=dtype)  # dtype too: older transformers
        pipe = FluxPipeline.from_pretrained(str(base), torch_dtype=dtype, **components)
    except Exception as exc:
        raise _unreachable("base model", str(base), exc) from exc
    return pipe


def check_offload(offload: str | None, device: torch.device) -> str:
    """The offload mode (``None`` = ``"none"``), refused when unknown or when there is no GPU to offload to."""
    offload = offload or "none"
    if offload not in OFFLOAD_MODES:
        raise IdcraftError(f"unknown offload mode {offload!r}; choose one of {', '.join(OFFLOAD_MODES)}.")
    if offload != "none" and device.type == "cpu":
        raise IdcraftError(
            f"--offload {offload} moves weights between RAM and a GPU, but the run is on the CPU: "
            "use --device cuda, or leave --offload out."
        )
    return offload


def meta_transformer(base: str | os.PathLike):
    """The base's FLUX transformer on the meta device: its config and parameter shapes, no weights."""
    from diffusers import FluxTransformer2DModel

    return meta_model(FluxTransformer2DModel, base, "transformer")


@contextlib.contextmanager
def visiting(offload: str, device: torch.device, modules: list[nn.Module]) -> Iterator[None]:
    """With offloading: ``modules`` on ``device`` (the GPU) for the duration, back in RAM after; without,
    nothing moves."""
    if offload == "none":
        yield
        return
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            module.to("cpu")
