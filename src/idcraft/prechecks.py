"""Refusals that would otherwise come after a model load, made from headers and listings first.

Loading a base model, an image encoder and an adapter takes 30-100 s; a wrong combination found only
then wastes all of it. What a file header, a config file or a directory listing already tells is checked
here in milliseconds, before any weights are read: an adapter made for another base (its key/value
weights' input width against the base UNet's ``cross_attention_dim``), a device this machine does not
have, a training ``--data`` folder with nothing to train on. Importing this module imports neither torch
nor diffusers (the device check imports torch, which it must ask).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .errors import IdcraftError, IncompatibleAdapterError, ModelLoadError

#: Cross-attention widths of the published base families, for messages.
CROSS_ATTENTION_NAMES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


def named_width(value: int) -> str:
    return f"{value} ({CROSS_ATTENTION_NAMES[value]})" if value in CROSS_ATTENTION_NAMES else str(value)


def cross_attention_mismatch(adapter_width: int, unet_width: int, base_name: str) -> IncompatibleAdapterError:
    """The error for an adapter whose key/value weights read ``adapter_width``-wide text features on a
    UNet whose cross-attention width is ``unet_width`` (one wording, before and after loading)."""
    hint = {768: "an SD1.5 base model", 2048: "an SDXL base model"}.get(
        adapter_width, "a matching base model"
    )
    other = {
        768: "an SD1.5 adapter (e.g. ip-adapter_sd15.bin)",
        2048: "an SDXL adapter (e.g. ip-adapter_sdxl.bin)",
    }
    return IncompatibleAdapterError(
        f"the adapter was made for a UNet with cross-attention width {named_width(adapter_width)}, "
        f"but {base_name} has {named_width(unet_width)}. Use {hint} with this adapter, "
        f"or {other.get(unet_width, 'an adapter made for this base model')}."
    )


# ---------------------------------------------------------------------------- adapter vs base
def safetensors_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """Every tensor's shape from a ``.safetensors`` file's JSON header (its first 8 + N bytes); no tensor
    data is read. Empty when the header cannot be read (the loader then says why, in its own words)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return {}
    return {k: list(v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)}


def adapter_width(path: str | os.PathLike) -> int | None:
    """The text-feature width the adapter's image key/value layers read (``to_k_ip.weight``'s input
    side), from the file's header: the safetensors header, or a memory-mapped ``.bin`` (shapes only)."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":
        shapes = safetensors_shapes(path)
    else:
        shapes = _bin_shapes(path)
    for key, shape in shapes.items():
        if key.endswith("to_k_ip.weight") and len(shape) == 2:
            return int(shape[1])
    return None


def _bin_shapes(path: Path) -> dict[str, list[int]]:
    from .checkpoints import load_torch_file
    from .errors import CheckpointError

    try:
        data = load_torch_file(path, mmap=True)
    except CheckpointError:
        return {}  # the loader reports it, with its full diagnosis
    if not isinstance(data, dict):
        return {}
    return {
        f"{group}.{key}": list(getattr(tensor, "shape", ()))
        for group, tensors in data.items()
        if isinstance(tensors, dict)
        for key, tensor in tensors.items()
    }


def base_width(base: str | os.PathLike) -> int | None:
    """``cross_attention_dim`` of a local base folder's ``unet/config.json``; ``None`` for a hub id, a
    FLUX folder (no UNet) or an unreadable config (the loader reports that)."""
    try:
        config = json.loads((Path(base) / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    width = config.get("cross_attention_dim") if isinstance(config, dict) else None
    if isinstance(width, (list, tuple)):
        width = width[0] if width else None
    return width if isinstance(width, int) else None


def check_adapter_fits_base(base: str | os.PathLike, adapter: str | os.PathLike) -> None:
    """Refuse an adapter made for another base family (SDXL's on SD1.5, say) from the two files' headers,
    before anything loads. Silent when either side cannot be read this way: the full check after
    loading still runs."""
    unet = base_width(base)
    mine = adapter_width(adapter) if unet is not None else None
    if unet is not None and mine is not None and mine != unet:
        raise cross_attention_mismatch(mine, unet, f"base model {base}")


# ---------------------------------------------------------------------------- paths
def missing_local_path(name: str) -> bool:
    """Whether ``name`` is meant as a local folder that is not there, rather than a hub id (``org/name``):
    it starts with ``.``, ``/`` or ``~``, has more than one ``/``, ends with one, holds a backslash, or its
    first part is a folder here (``models/image_encoder`` beside a ``models/`` folder)."""
    if Path(name).expanduser().exists():
        return False
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/"):
        return True
    if os.sep != "/" and os.sep in name or "\\" in name:
        return True
    head = name.split("/", 1)[0]
    return "/" in name and bool(head) and Path(head).is_dir()


def check_local_path(what: str, name: str | os.PathLike) -> None:
    """Refuse a path-like name that does not exist before any loader takes it for a hub id."""
    if missing_local_path(str(name)):
        raise ModelLoadError(f"{what} {str(name)!r}: no such directory (it is a path here, not a hub id).")


# ---------------------------------------------------------------------------- devices
def check_device_available(device: str | None) -> None:
    """Refuse a device this machine does not have (``cuda`` without a CUDA GPU, ``mps`` off Apple
    silicon, ``cuda:3`` on a two-GPU machine) before any model loads. ``None``/``auto``/``cpu`` pass."""
    if device is None:
        return
    kind, _, index = str(device).partition(":")
    if kind in ("auto", "cpu"):
        return
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only PyTorch build" if torch.version.cuda is None else "no CUDA GPU visible"
            raise IdcraftError(
                f"--device {device}: this machine has no CUDA GPU PyTorch can use ({build}, torch "
                f"{torch.__version__}); use --device cpu, or auto to take whatever is there."
            )
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise IdcraftError(
                f"--device {device}: there are {count} CUDA GPU(s), numbered 0 to {count - 1}."
            )
    elif kind == "mps":
        if not torch.backends.mps.is_available():
            raise IdcraftError(
                f"--device {device}: MPS (Apple silicon) is not available on this machine; use --device cpu "
                "or auto."
            )
    elif kind == "xpu":
        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise IdcraftError(
                f"--device {device}: no Intel XPU is available here; use --device cpu or auto."
            )


# ---------------------------------------------------------------------------- training data
#: Image files ``idcraft train`` reads from a --data folder (as :mod:`idcraft.training.data` lists them).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})


def check_training_data(data: str | os.PathLike) -> None:
    """Refuse a ``--data`` with nothing to train on -- an empty folder, a folder without images, images
    without any caption, an empty manifest -- from a directory listing, before any model loads."""
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix.lower() in (".jsonl", ".json"):
            try:
                with path.open(encoding="utf-8") as f:
                    empty = not any(line.strip() for line in f)
            except (OSError, UnicodeDecodeError) as exc:
                raise IdcraftError(f"--data {path}: cannot read this manifest ({exc}).") from exc
            if empty:
                raise IdcraftError(
                    f"--data {path}: the manifest is empty; it needs one JSON line per sample."
                )
        return
    if not path.is_dir():
        return  # the caller's own check names a missing path
    images = 0
    for _folder, _, files in os.walk(path):
        names = set(files)
        for name in files:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            images += 1
            if stem + ".txt" in names:
                return  # one usable sample is enough to start; the loader reports the rest
    if images == 0:
        raise IdcraftError(
            f"--data {path}: no images in this folder (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, "
            "in subfolders too). Point --data at a folder of images, each with a .txt caption beside it."
        )
    raise IdcraftError(
        f"--data {path}: {images} image(s) but none has a caption: each image needs a .txt file of the "
        "same name beside it (photo.jpg + photo.txt)."
    )
