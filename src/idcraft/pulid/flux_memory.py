"""What a PuLID-FLUX run will need, known before anything loads (InstantCharacter's estimate, reused).

Parameter counts come from safetensors headers (:mod:`idcraft.instantcharacter.memory`): the FLUX
components of the base folder, the release's ``pulid_ca`` modules (on the GPU with the transformer) and
its IDFormer (``pulid_encoder``), which with the EVA-CLIP tower visits the GPU once per reference when
offloading.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..checkpoints import load_torch_file
from ..errors import IdcraftError
from ..instantcharacter.memory import (
    LABELS,
    MemoryEstimate,
    ParamCount,
    activation_bytes,
    flux_params,
    free_memory,
    vae_scale_factor,
)

log = logging.getLogger(__name__)

LABELS.setdefault("id_encoder", "IDFormer")
LABELS.setdefault("id_attention", "ID cross-attention")
LABELS.setdefault("eva_clip", "EVA-CLIP")


class PulidFluxMemory(MemoryEstimate):
    """The estimate with PuLID-FLUX's parts placed: ID cross-attention with the transformer, the
    IDFormer and EVA-CLIP visiting once per reference."""

    RESIDENT = ("id_attention",)
    VISITING = ("id_encoder", "eva_clip")
    WITH_TRANSFORMER = ()
    RAM_GROUPS = (("id_encoder", "id_attention", "eva_clip"),)


def release_params(path: str | os.PathLike) -> dict[str, ParamCount]:
    """The release file's parameters split into ``id_encoder`` and ``id_attention`` (header only for
    safetensors)."""
    from ..instantcharacter.memory import _count, _shapes_from_safetensors

    path = Path(path)
    if path.suffix == ".safetensors":
        shapes = _shapes_from_safetensors([path])
    else:
        data = load_torch_file(path, mmap=True)
        shapes = {k: tuple(t.shape) for k, t in data.items() if isinstance(t, torch.Tensor)}
    encoder = [s for k, s in shapes.items() if k.startswith("pulid_encoder.")]
    attention = [s for k, s in shapes.items() if k.startswith("pulid_ca.")]
    return {"id_encoder": _count(encoder), "id_attention": _count(attention)}


def estimate_memory(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    *,
    device: torch.device,
    dtype: torch.dtype,
    offload: str = "none",
    width: int | None = None,
    height: int | None = None,
    eva_clip: str | os.PathLike | None = None,
) -> PulidFluxMemory | None:
    """The estimate for a local FLUX folder and release file; ``None`` for hub ids (nothing to read)."""
    if not Path(adapter).is_file() or not (Path(base) / "model_index.json").is_file():
        return None
    params = flux_params(base)
    params.update(release_params(adapter))
    if eva_clip is not None and Path(eva_clip).is_file():
        # The file holds the whole float32 CLIP; the visual tower is ~71% of it (EVA02-L-336: 304M of 428M).
        total = Path(eva_clip).stat().st_size // 4
        params["eva_clip"] = ParamCount(int(total * 0.71), 0)
    transformer_config = json.loads((Path(base) / "transformer" / "config.json").read_text())
    vae_config = json.loads((Path(base) / "vae" / "config.json").read_text())
    side = 128 * vae_scale_factor(vae_config)
    activations = activation_bytes(transformer_config, vae_config, dtype, width or side, height or side)
    gpu_free, ram_free = free_memory(device)
    estimate = PulidFluxMemory(params, dtype, device, offload, activations, gpu_free, ram_free)
    for mode in ("none", "model", "sequential"):
        estimate.alternatives[mode] = PulidFluxMemory(params, dtype, device, mode, activations).gpu_bytes
    return estimate


def estimate_or_none(base, adapter, **kwargs) -> PulidFluxMemory | None:
    """:func:`estimate_memory`, or ``None`` (logged) when a file cannot be read: the estimate must never be
    why a run fails."""
    try:
        return estimate_memory(base, adapter, **kwargs)
    except (OSError, ValueError, KeyError, IdcraftError) as exc:
        log.warning("memory estimate skipped: %s", exc)
        return None
