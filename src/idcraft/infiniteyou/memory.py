"""What an InfiniteYou run needs, estimated before anything loads (InstantCharacter's estimator, reused).

The FLUX components are counted from their safetensors headers as for InstantCharacter; InfuseNet is
counted the same way and placed where the transformer is (it runs beside it at every step, so with
``--offload model`` it stays on the GPU with the transformer), the small identity Resampler stays on the
GPU. Official figures for comparison: about 43 GB of GPU memory in bfloat16, 30 GB with offloading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoints import load_torch_file
from ..instantcharacter.memory import (
    MemoryEstimate,
    _count,
    activation_bytes,
    flux_params,
    folder_params,
    free_memory,
)
from .release import ReleasePaths


def estimate_memory(
    base: str | os.PathLike,
    release: ReleasePaths,
    *,
    device: torch.device,
    dtype: torch.dtype,
    offload: str = "none",
    width: int | None = None,
    height: int | None = None,
) -> MemoryEstimate | None:
    """The estimate for a local FLUX folder and release; ``None`` when the base is a hub id."""
    from diffusers import FluxControlNetModel

    if not (Path(base) / "model_index.json").is_file():
        return None
    params = flux_params(base)
    # "attention" is where the estimator places weights that run beside the transformer every step.
    params["attention"] = folder_params(release.infusenet, FluxControlNetModel)
    state = load_torch_file(release.image_proj, mmap=True)
    params["resampler"] = _count(tuple(t.shape) for t in state.get("image_proj", {}).values())
    transformer_config = json.loads((Path(base) / "transformer" / "config.json").read_text())
    vae_config = json.loads((Path(base) / "vae" / "config.json").read_text())
    activations = 2 * activation_bytes(transformer_config, vae_config, dtype, width or 864, height or 1152)
    gpu_free, ram_free = free_memory(device)
    estimate = MemoryEstimate(params, dtype, device, offload, activations, gpu_free, ram_free)
    estimate.labels = {"attention": "InfuseNet", "resampler": "identity resampler"}
    for mode in ("none", "model", "sequential"):
        estimate.alternatives[mode] = MemoryEstimate(params, dtype, device, mode, activations).gpu_bytes
    return estimate
