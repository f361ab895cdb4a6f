"""Loading the frozen parts: base pipelines and image encoders, from a local folder or a hub id.

Nothing here downloads silently into a surprise: a hub id that cannot be reached fails with a message
that says how to point at a local folder instead.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .errors import IdcraftError, ModelLoadError
from .notices import drop_library_notices
from .prechecks import check_local_path, missing_local_path

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
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise IdcraftError(
            f"--device {device!r}: not a device PyTorch knows; use auto, cpu, cuda, cuda:N or mps."
        ) from exc
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
    if missing_local_path(name):
        return ModelLoadError(f"{what} {name!r}: no such directory.")
    return ModelLoadError(
        f"cannot load {what} {name!r}: it is not a local directory and the Hugging Face Hub could not provide "
        f"it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). On a machine with network "
        f"access run `hf download {name} --local-dir DIR` (or copy the folder over), then pass DIR instead."
    )


#: What a diffusers Stable Diffusion pipeline folder holds (named in messages about folders that do not).
SD_FOLDER_LAYOUT = "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/"


def _read_config(path: Path) -> dict | None:
    """A JSON object from ``path``, or ``None`` when it is missing or not JSON."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _config_model_name(config: dict) -> str | None:
    """The class a ``config.json`` describes: diffusers' ``_class_name`` or transformers' ``architectures``."""
    architectures = config.get("architectures") or []
    return (
        config.get("_class_name") or (architectures[0] if architectures else None) or config.get("model_type")
    )


def _check_base_folder(folder: Path) -> None:
    """Explain a local ``--base`` that is not a complete diffusers pipeline folder, before diffusers does
    (its own message names a missing config.json, which misleads: the folder is the wrong kind)."""
    if folder.is_file():
        raise ModelLoadError(
            f"base model {folder} is a file; --base needs a diffusers pipeline folder ({SD_FOLDER_LAYOUT}) or "
            "a hub id. Single-file checkpoints can be converted with diffusers' from_single_file + "
            "save_pretrained."
        )
    if not folder.is_dir():
        return
    index = _read_config(folder / "model_index.json")
    if index is None:
        missing = (
            "no unet/ subfolder and no model_index.json"
            if not (folder / "unet").is_dir()
            else "no model_index.json"
        )
        config = _read_config(folder / "config.json")
        hint = ""
        if config is not None and _config_model_name(config):
            hint = (
                f" It holds a single model ({_config_model_name(config)}), not a pipeline: pass the pipeline "
                "folder that contains it (usually its parent)."
            )
        raise ModelLoadError(
            f"base model {folder} has {missing}: it is not a diffusers Stable Diffusion pipeline folder "
            f"(expected {SD_FOLDER_LAYOUT}).{hint}"
        )
    absent = [
        name
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and value
        and value[0] is not None
        and not (folder / name).is_dir()
    ]
    if absent:
        names = ", ".join(f"{name}/" for name in absent)
        raise ModelLoadError(
            f"base model {folder} has no {names} subfolder although its model_index.json lists "
            f"{'it' if len(absent) == 1 else 'them'}: it is not a complete diffusers Stable Diffusion pipeline "
            f"folder (expected {SD_FOLDER_LAYOUT}); an interrupted download or copy? Fetch the folder again."
        )


def base_kind(base: str | os.PathLike) -> tuple[str, str]:
    """``(kind, class name)`` of a diffusers pipeline folder or hub id, from its ``model_index.json``."""
    from diffusers import DiffusionPipeline

    _check_base_folder(Path(base).expanduser())
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


def diffusers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The load dtype as the keyword diffusers takes it: ``dtype`` in releases that renamed it (they warn
    on every ``torch_dtype``), ``torch_dtype`` in older ones."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def load_base_pipeline(base: str | os.PathLike, *, device: torch.device, dtype: torch.dtype):
    """Load an SD1.5/SDXL diffusers pipeline (without the SD1.5 safety checker, as the official demos do)."""
    drop_library_notices()  # before diffusers' pipeline modules are imported: they print on import
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kind, _ = base_kind(base)
    try:
        if kind == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(str(base), **diffusers_dtype(dtype))
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(base), **diffusers_dtype(dtype), safety_checker=None, requires_safety_checker=False
            )
    except Exception as exc:
        raise _unreachable("base model", str(base), exc) from exc
    return pipe.to(device)


def load_image_encoder(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
):
    """Load a ``CLIPVisionModelWithProjection`` (the encoder folder shipped next to the adapters)."""
    check_local_path("image encoder", path)  # before transformers loads (seconds) or asks the hub
    from transformers import CLIPVisionModelWithProjection

    _check_image_encoder_folder(Path(path).expanduser())
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(str(path))
    except Exception as exc:
        raise _unreachable("image encoder", str(path), exc) from exc
    return model.to(device=device, dtype=dtype).eval()


def _check_image_encoder_folder(folder: Path) -> None:
    """Refuse a local folder that holds some other model than a CLIP vision encoder, reading its
    ``config.json`` first: transformers would load a text encoder's weights into a vision model and fail
    with a size mismatch and a pointer to a report the user never sees."""
    if folder.is_file():
        raise ModelLoadError(
            f"image encoder {folder} is a file; --image-encoder needs a CLIPVisionModelWithProjection folder "
            "(config.json + model.safetensors), e.g. IP-Adapter's models/image_encoder/, or a hub id."
        )
    if not folder.is_dir():
        return
    expected = (
        "a CLIPVisionModelWithProjection folder (config.json + model.safetensors), e.g. IP-Adapter's "
        "models/image_encoder/ (ViT-H) or sdxl_models/image_encoder/ (ViT-bigG)"
    )
    config = _read_config(folder / "config.json")
    if config is None:
        hint = ""
        if (folder / "image_encoder" / "config.json").is_file():
            hint = f" Did you mean {folder / 'image_encoder'}?"
        elif (folder / "model_index.json").is_file():
            hint = " It is a diffusers pipeline folder, not an image encoder."
        raise ModelLoadError(
            f"image encoder {folder} has no readable config.json: expected {expected}.{hint}"
        )
    model_type = str(config.get("model_type", ""))
    architectures = [str(a) for a in config.get("architectures") or []]
    if model_type in ("clip_vision_model", "clip") or any(a.startswith("CLIPVision") for a in architectures):
        return  # a full CLIPModel folder loads its vision half
    name = _config_model_name(config) or "model of unknown type"
    if model_type == "clip_text_model" or any(a.startswith("CLIPText") for a in architectures):
        raise ModelLoadError(
            f"image encoder {folder} is a CLIP text encoder ({name}), not a CLIP vision model: it reads "
            f"prompts, not images. Pass {expected}; a base model's text_encoder/ folder will not do."
        )
    raise ModelLoadError(f"image encoder {folder} is a {name}, not a CLIP vision model: expected {expected}.")


def load_controlnet(path: str | os.PathLike, *, device: torch.device, dtype: torch.dtype):
    drop_library_notices()
    from diffusers import ControlNetModel

    try:
        model = ControlNetModel.from_pretrained(str(path), **diffusers_dtype(dtype))
    except Exception as exc:
        raise _unreachable("ControlNet", str(path), exc) from exc
    return model.to(device)


def meta_model(cls, base: str | os.PathLike, subfolder: str):
    """``cls`` (a diffusers model class) built on the meta device from ``base/subfolder/config.json``: its
    structure and widths without reading its weights, so an adapter is checked against a base model in
    milliseconds, before gigabytes load. A damaged config is a :class:`ModelLoadError` naming the file."""
    folder = os.path.join(str(base), subfolder)
    try:
        config = cls.load_config(folder)
        with torch.device("meta"):
            return cls.from_config(config)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(
            f"base model {base}: cannot read {folder}/config.json ({exc}). The file is damaged or not a "
            f"diffusers {cls.__name__} config: copy the base model folder again."
        ) from exc
