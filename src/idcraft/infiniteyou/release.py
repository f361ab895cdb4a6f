"""The released InfiniteYou files: where they are in a folder, and loading them with their widths.

Layout (``ByteDance/InfiniteYou``, ``infu_flux_v1.0/<model version>/``)::

    InfuseNetModel/          a diffusers FluxControlNetModel folder (config.json + safetensors, sharded or not)
    image_proj_model.bin     torch.save({"image_proj": Resampler state dict}); read with weights_only=True

``--adapter`` may name that folder, its parent (``infu_flux_v1.0``, then ``--model-version`` picks
``aes_stage2`` or ``sim_stage1``) or the repository root; or ``image_proj_model.bin`` alone with the
InfuseNet folder given as ``--controlnet``. Every width comes from the files: the Resampler's from its
tensor shapes (heads of 64, as the official constructor), InfuseNet's from its config. Finding the files
imports no torch (the command line checks them before loading anything).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, IdcraftError

#: The released model versions: stage-2 aesthetics fine-tune (default) and stage-1 identity similarity.
MODEL_VERSIONS = ("aes_stage2", "sim_stage1")
DEFAULT_MODEL_VERSION = "aes_stage2"
INFUSENET_DIR = "InfuseNetModel"
IMAGE_PROJ_FILE = "image_proj_model.bin"
#: The official version folder under the repository root.
RELEASE_DIR = "infu_flux_v1.0"


@dataclass(frozen=True)
class ReleasePaths:
    """Where the two parts of one InfiniteYou model are."""

    infusenet: Path
    image_proj: Path


def is_release(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like an InfiniteYou release (a model folder, a parent of one, or its
    ``image_proj_model.bin``)."""
    path = Path(path)
    if path.is_file():
        return path.name == IMAGE_PROJ_FILE
    candidates = [
        path,
        *(path / v for v in MODEL_VERSIONS),
        *(path / RELEASE_DIR / v for v in MODEL_VERSIONS),
    ]
    return any((c / INFUSENET_DIR).is_dir() for c in candidates)


def locate_release(
    adapter: str | os.PathLike,
    model_version: str | None = None,
    infusenet: str | os.PathLike | None = None,
) -> ReleasePaths:
    """The InfuseNet folder and Resampler file of ``adapter`` (see the module docstring), or a one-line
    error saying what was found and what to pass."""
    if model_version is not None and model_version not in MODEL_VERSIONS:
        raise IdcraftError(
            f"--model-version {model_version!r}: InfiniteYou-FLUX v1.0 has {' and '.join(MODEL_VERSIONS)}."
        )
    path = Path(adapter)
    if path.is_file():
        if infusenet is None:
            raise IdcraftError(
                f"{path} is the identity projector alone: give the InfuseNet folder too (--controlnet "
                f"{path.parent / INFUSENET_DIR}), or pass the folder holding both as --adapter."
            )
        return ReleasePaths(_infusenet_dir(Path(infusenet)), path)
    if not path.is_dir():
        raise IdcraftError(f"--adapter {adapter}: no such file or folder.")
    version = model_version or DEFAULT_MODEL_VERSION
    for folder in (path, path / version, path / RELEASE_DIR / version):
        if (folder / INFUSENET_DIR).is_dir() or (folder / IMAGE_PROJ_FILE).is_file():
            net = _infusenet_dir(Path(infusenet) if infusenet is not None else folder / INFUSENET_DIR)
            proj = folder / IMAGE_PROJ_FILE
            if not proj.is_file():
                raise IdcraftError(
                    f"{folder} has {INFUSENET_DIR}/ but no {IMAGE_PROJ_FILE} (the identity projector): copy "
                    "the whole model-version folder of the release."
                )
            return ReleasePaths(net, proj)
    found = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())[:8]) or "nothing"
    raise IdcraftError(
        f"--adapter {adapter} has no {INFUSENET_DIR}/ (found {found}): give an InfiniteYou model folder "
        f"({RELEASE_DIR}/{version} of ByteDance/InfiniteYou, holding {INFUSENET_DIR}/ and {IMAGE_PROJ_FILE})."
    )


def _infusenet_dir(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise IdcraftError(
            f"{folder} is not an InfuseNet folder (no config.json): it must be a diffusers FluxControlNetModel "
            f"folder, {INFUSENET_DIR}/ of the release."
        )
    return folder


def load_image_proj(path: str | os.PathLike):
    """The identity Resampler of ``image_proj_model.bin``, shaped by its tensors (float32, CPU)."""
    import torch

    from ..checkpoints import load_torch_file
    from ..projections import Resampler

    try:
        state = load_torch_file(str(path))
    except Exception as exc:  # a pickle torch refuses, a truncated file
        raise CheckpointError(f"{path}: cannot be read as a torch file ({exc}).") from exc
    if not isinstance(state, dict) or "image_proj" not in state:
        keys = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: expected {{'image_proj': Resampler state}}, found {keys}.")
    image_proj = state["image_proj"]
    try:
        config = Resampler.config_from_state_dict(image_proj)
        with torch.device("meta"):
            resampler = Resampler(**config)
        resampler.load_state_dict(image_proj, strict=True, assign=True)
    except (KeyError, RuntimeError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: image_proj is not an InfiniteYou Resampler ({detail}).") from exc
    return resampler.float().eval()


def load_infusenet(folder: str | os.PathLike, dtype):
    """InfuseNet (a diffusers ``FluxControlNetModel``) from its folder, in ``dtype``."""
    from diffusers import FluxControlNetModel

    try:
        return FluxControlNetModel.from_pretrained(str(folder), torch_dtype=dtype).eval()
    except Exception as exc:
        raise CheckpointError(f"{folder}: cannot load InfuseNet as a FluxControlNetModel ({exc}).") from exc


def save_release(folder: str | os.PathLike, infusenet, resampler) -> Path:
    """Write the release layout (``InfuseNetModel/`` + ``image_proj_model.bin``) into ``folder``; the
    projector file is written atomically."""
    import torch

    from ..outputs import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    infusenet.save_pretrained(str(folder / INFUSENET_DIR))
    state = {k: v.detach().cpu().contiguous() for k, v in resampler.state_dict().items()}
    atomic_write(folder / IMAGE_PROJ_FILE, lambda f: torch.save({"image_proj": state}, f))
    return folder
