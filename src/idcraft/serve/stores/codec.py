"""A :class:`~idcraft.engine.Conditioning` as safetensors bytes, and back: how one replica's encoding
becomes another's cache hit.

A conditioning's value is a small tree of idcraft dataclasses (``ReferenceTokens`` with its
``Identity`` list, InstantCharacter's ``SubjectFeatures``), tensors, numpy arrays, face crops (PIL images)
and plain values. The tensors, arrays and images go into the safetensors file (exact dtypes, on CPU); the
tree that places them is JSON in the file's metadata. Reading rebuilds only dataclasses defined in
idcraft's own modules (a store is data, never code to run), and puts tensors that were on an accelerator
on the device the reading replica serves from.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import struct
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...engine import Conditioning

META = "idcraft.conditioning"
VERSION = 1


class CodecError(ValueError):
    """The value holds something this codec does not store (then it stays in the process cache only)."""


def encode(conditioning: Conditioning) -> bytes:
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    tree = {"version": VERSION, "method": conditioning.method, "value": _pack(conditioning.value, tensors)}
    return save(tensors, metadata={META: json.dumps(tree)})


def decode(data: bytes, device: str | torch.device | None = None) -> Conditioning:
    """The conditioning in ``data``; tensors saved from an accelerator go to ``device`` (default: CPU)."""
    from safetensors.torch import load

    tree = json.loads(_metadata(data)[META])
    if tree.get("version") != VERSION:
        raise CodecError(f"conditioning format {tree.get('version')} (this idcraft reads {VERSION})")
    tensors = load(data)
    return Conditioning(tree["method"], _unpack(tree["value"], tensors, device))


def _metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise CodecError("not a safetensors file")
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    metadata = header.get("__metadata__") or {}
    if META not in metadata:
        raise CodecError("a safetensors file without idcraft's conditioning metadata")
    return metadata


def _pack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def keep(tensor: torch.Tensor) -> str:
        name = f"t{len(tensors)}"
        tensors[name] = tensor.detach().to("cpu").contiguous().clone()
        return name

    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, torch.Tensor):
        return {"tensor": keep(value), "device": value.device.type}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise CodecError("a numpy array of Python objects")
        return {"ndarray": keep(torch.from_numpy(np.ascontiguousarray(value)))}
    if isinstance(value, np.generic):
        return {"value": value.item()}
    if isinstance(value, Image.Image):
        return {"image": keep(torch.from_numpy(np.array(value))), "mode": value.mode}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if not cls.__module__.startswith("idcraft."):
            raise CodecError(f"a {cls.__qualname__} (only idcraft's own dataclasses are stored)")
        fields = {f.name: _pack(getattr(value, f.name), tensors) for f in dataclasses.fields(value) if f.init}
        return {"dataclass": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise CodecError("a mapping with keys that are not strings")
        return {"dict": {k: _pack(v, tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_pack(v, tensors) for v in value]}
    raise CodecError(f"a {type(value).__qualname__}")


def _unpack(node: Any, tensors: dict[str, torch.Tensor], device) -> Any:
    if "value" in node:
        return node["value"]
    if "tensor" in node:
        tensor = tensors[node["tensor"]]
        return tensor if node.get("device", "cpu") == "cpu" or device is None else tensor.to(device)
    if "ndarray" in node:
        return tensors[node["ndarray"]].numpy()
    if "image" in node:
        image = Image.fromarray(tensors[node["image"]].numpy())
        return image if image.mode == node["mode"] else image.convert(node["mode"])
    if "dataclass" in node:
        cls = _dataclass(node["dataclass"])
        return cls(**{k: _unpack(v, tensors, device) for k, v in node["fields"].items()})
    if "dict" in node:
        return {k: _unpack(v, tensors, device) for k, v in node["dict"].items()}
    if "list" in node:
        return [_unpack(v, tensors, device) for v in node["list"]]
    if "tuple" in node:
        return tuple(_unpack(v, tensors, device) for v in node["tuple"])
    raise CodecError(f"unknown node {sorted(node)}")


def _dataclass(name: str) -> type:
    module, _, qualname = name.partition(":")
    if not module.startswith("idcraft.") or "." in qualname:
        raise CodecError(f"{name} is not one of idcraft's dataclasses")
    cls = getattr(importlib.import_module(module), qualname, None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise CodecError(f"{name} is not one of idcraft's dataclasses")
    return cls
