"""Loading the frozen parts: base pipelines and image encoders, from a local folder or a hub id.

Nothing here downloads silently into a surprise: a hub id that cannot be reached fails with a message
that says how to point at a local folder instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .errors import IdcraftError, ModelLoadError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Base pipeline classes the IP-Adapter family runs on, by their ``model_index.json`` class name.
BASE_KINDS = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
}


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA if available, else MPS, else CPU; an explicit device must exist."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise IdcraftError(
            f"--device {device} was asked for, but this PyTorch build sees no CUDA GPU; use --device cpu."
        )
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` -> float16 on GPUs (what the released adapters were run in), float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.float16
    if dtype not in DTYPES:
        raise IdcraftError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def _unreachable(what: str, name: str, exc: Exception) -> ModelLoadError:
    local = Path(name).expanduser()
    if local.exists():
        return ModelLoadError(f"cannot load {what} from {local}: {exc}")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        return ModelLoadError(f"{what} {name!r}: no such directory.")
    return ModelLoadError(
        f"cannot load {what} {name!r}: it is not a local directory and the Hugging Face Hub could not provide "
        f"it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). On a machine with network "
        f"access run `hf download {name} --local-dir DIR` (or copy the folder over), then pass DIR instead."
    )


def base_kind(base: str | os.PathLike) -> tuple[str, str]:
    """``(kind, class name)`` of a diffusers pipeline folder or hub id, from its ``model_index.json``."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(str(base))
    except Exception as exc:  # diffusers raises OSError, EnvironmentError or hub errors
        raise _unreachable("base model", str(base), exc) from exc
    name = index.get("_class_name", "?")
    if name not in BASE_KINDS:
        raise ModelLoadError(
            f"base model {base} is a {name}; the IP-Adapter family runs on Stable Diffusion 1.x/2.x and SDXL "
            "pipelines (StableDiffusionPipeline, StableDiffusionXLPipeline)."
        )
    return BASE_KINDS[name], name


def load_base_pipeline(base: str | os.PathLike, *, device: torch.device, dtype: torch.dtype):
    """Load an SD1.5/SDXL diffusers pipeline (without the SD1.5 safety checker, as the official demos do)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kind, _ = base_kind(base)
    try:
        if kind == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(str(base), torch_dtype=dtype)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(base), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
            )
    except Exception as exc:
        raise _unreachable("base model", str(base), exc) from exc
    return pipe.to(device)


def load_image_encoder(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
):
    """Load a ``CLIPVisionModelWithProjection`` (the encoder folder shipped next to the adapters)."""
    from transformers import CLIPVisionModelWithProjection

    try:
        model = CLIPVisionModelWithProjection.from_pretrained(str(path))
    except Exception as exc:
        raise _unreachable("image encoder", str(path), exc) from exc
    return model.to(device=device, dtype=dtype).eval()


def load_controlnet(path: str | os.PathLike, *, device: torch.device, dtype: torch.dtype):
    from diffusers import ControlNetModel

    try:
        model = ControlNetModel.from_pretrained(str(path), torch_dtype=dtype)
    except Exception as exc:
        raise _unreachable("ControlNet", str(path), exc) from exc
    return model.to(device)
