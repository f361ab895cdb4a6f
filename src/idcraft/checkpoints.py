"""Official adapter checkpoint files: read, write, nothing else.

Two layouts exist in the wild and both are read and written here, tensor for tensor:

* ``.bin``: ``torch.save({"image_proj": {...}, "ip_adapter": {...}})``, read with ``weights_only=True`` so a
  malicious pickle cannot run code;
* ``.safetensors``: one flat dict with ``image_proj.<key>`` / ``ip_adapter.<key>`` names.

The ``ip_adapter`` keys are ``"<i>.<param>"`` where ``i`` is the position of the layer's processor in
``unet.attn_processors`` (see :mod:`idcraft.injection`). Tensors keep their dtype and key order, so
``save_checkpoint(load_checkpoint(f))`` reproduces every tensor bit for bit. Writes are atomic (temp file
+ rename), so an interrupted save never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError
from .outputs import follow_umask, temporary_file

GROUPS = ("image_proj", "ip_adapter")


@dataclass
class AdapterCheckpoint:
    """The tensors of one adapter file, grouped as the official code groups them."""

    image_proj: dict[str, torch.Tensor]
    ip_adapter: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<memory>"

    def groups(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"image_proj": self.image_proj, "ip_adapter": self.ip_adapter}

    def num_parameters(self) -> int:
        return sum(t.numel() for group in self.groups().values() for t in group.values())


def load_checkpoint(path: str | os.PathLike) -> AdapterCheckpoint:
    """Read an official ``.bin`` or flat ``.safetensors`` adapter file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such adapter file.")
    if path.suffix == ".safetensors":
        groups, metadata = _read_safetensors(path)
    else:
        groups, metadata = _read_bin(path), {}
    missing = [g for g in GROUPS if not groups.get(g)]
    if missing:
        found = sorted(groups) if groups else "nothing"
        raise CheckpointError(
            f"{path}: not an IP-Adapter checkpoint: it has no {' / '.join(missing)} tensors (found {found}). "
            "Expected the official layout {'image_proj': ..., 'ip_adapter': ...}."
        )
    _check_finite(groups, path)
    return AdapterCheckpoint(groups["image_proj"], groups["ip_adapter"], metadata, str(path))


def _check_finite(groups: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    """A NaN or infinite weight makes every image black or noise: refuse the file, naming the tensor."""
    for group in GROUPS:
        for key, tensor in groups[group].items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(
                    f"{path}: {group}.{key} holds NaN or infinite values; the file is damaged, or was saved from a "
                    "diverged training run. Use another copy or an earlier checkpoint."
                )


def save_checkpoint(checkpoint: AdapterCheckpoint, path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` in the official layout chosen by the suffix (``.safetensors`` or ``.bin``)."""
    path = Path(path)
    groups = {
        g: {k: t.detach().cpu().contiguous() for k, t in d.items()} for g, d in checkpoint.groups().items()
    }
    with _atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            flat = {f"{g}.{k}": t for g, d in groups.items() for k, t in d.items()}
            save_file(flat, str(tmp), metadata=checkpoint.metadata or None)
        else:
            torch.save(groups, tmp)
    return path


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_file(path.parent, path.name)  # the mode open() would give, not mkstemp's 0600
    os.close(fd)
    try:
        yield tmp
        follow_umask(tmp)  # safetensors writes 0600 whatever the umask
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_safetensors(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in GROUPS}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                group, _, rest = key.partition(".")
                if group in groups and rest:
                    groups[group][rest] = f.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path}: cannot read this safetensors file ({exc}); it is probably truncated or corrupt "
            f"({path.stat().st_size:,} bytes on disk). Download it again."
        ) from exc
    return groups, metadata


#: The start of a pre-1.6 ``torch.save`` file: pickle protocol 2, then the 10-byte magic number as a LONG1.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _torch_file_kind(path: Path) -> str | None:
    """``"zip"`` (torch >= 1.6 ``torch.save``), ``"legacy"`` (the older format) or ``None``: not a file
    ``torch.save`` writes, whatever ``torch.load`` would say about it."""
    if zipfile.is_zipfile(path):
        return "zip"
    with path.open("rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
    if head.startswith(b"PK\x03\x04"):
        return "cut zip"  # a zip archive's start without its end (the central directory): truncated
    return "legacy" if head == _LEGACY_TORCH_MAGIC else None


def _not_a_checkpoint(path: Path, detail: str = "") -> CheckpointError:
    size = path.stat().st_size
    return CheckpointError(
        f"{path}: not a PyTorch checkpoint ({size:,} bytes{detail}): it is neither a torch.save zip archive "
        "nor the older torch.save format, so it is corrupt or truncated (an interrupted download, a saved "
        "error page) or another kind of file. Download it again, or pass the .safetensors version."
    )


def _read_bin(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    try:
        kind = _torch_file_kind(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read this file ({exc.strerror or exc}).") from exc
    if kind is None:
        raise _not_a_checkpoint(path)
    if kind == "cut zip":
        raise CheckpointError(
            f"{path}: truncated or corrupt: it starts as a torch.save zip archive but its end is missing "
            f"({path.stat().st_size:,} bytes on disk), e.g. an interrupted download or copy. Download it again."
        )
    data = load_torch_file(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of tensor groups, found {type(data).__name__}.")
    return {g: dict(data[g]) for g in GROUPS if isinstance(data.get(g), dict)}


def load_torch_file(path: str | os.PathLike, *, mmap: bool = False):
    """The one way idcraft reads a ``torch.save`` file (adapters, training state, memory estimates):
    ``weights_only=True``, so a pickle carrying code is refused without running it, and every failure is
    a :class:`CheckpointError` in idcraft's words -- never torch's advice to load unsafely."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not _refused_object(exc):  # not a refused class but bytes that are no pickle at all
            raise CheckpointError(
                f"{path}: cannot read this checkpoint: its data is not a valid torch.save pickle, so it is "
                f"corrupt or truncated ({_size(path)} on disk). Download it again."
            ) from exc
        raise CheckpointError(
            f"{path}: refused: the file contains Python code/objects that are not plain tensors "
            f"({_refused_name(exc)}), and loading it could run that code. idcraft only loads weights; get the "
            "file from a trusted source as .safetensors."
        ) from exc
    except Exception as exc:  # RuntimeError, EOFError, BadZipFile, OSError, KeyError ...: damaged inside
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in first or "unsafe" in first.lower():  # torch's wording: not shown to users
            first = type(exc).__name__
        raise CheckpointError(
            f"{path}: cannot read this checkpoint ({first}); it is probably truncated or corrupt "
            f"({_size(path)} on disk). Download it again."
        ) from exc


def _refused_object(exc: Exception) -> bool:
    text = str(exc).lower()
    return "global" in text or "weights only load failed" in text or "unsupported class" in text


def _refused_name(exc: Exception) -> str:
    """The object torch refused (``os.system``, a class), from its message; the message itself advises
    ``weights_only=False``, which idcraft never repeats."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f"it asks for {found.group(1)}" if found else "objects that are not tensors"


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size:,} bytes"
    except OSError:
        return "unknown size"
