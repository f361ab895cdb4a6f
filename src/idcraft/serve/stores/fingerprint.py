"""A fingerprint of the models a served method encodes with, part of every identity-cache key.

Replicas that load the same files compute the same fingerprint (and share cache entries); a replica with
another adapter, encoder, dtype or face models computes another (and never reads a conditioning made by
different weights). It is read from the files, not the loaded tensors, so it costs milliseconds: each
file's name relative to its model folder, its size, and a hash of its first and last MiB (a changed
weight file changes its size or those bytes; paths themselves do not count, so mounts may differ).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

SAMPLE = 1 << 20


def file_sample(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(SAMPLE))
        if size > 2 * SAMPLE:
            handle.seek(size - SAMPLE)
            digest.update(handle.read(SAMPLE))
    return digest.hexdigest()


def path_sample(location: str | os.PathLike | None) -> Any:
    """A file's sample, a folder's samples by relative path, or the string itself (a hub id)."""
    if location is None:
        return None
    path = Path(location).expanduser()
    if path.is_file():
        return file_sample(path)
    if path.is_dir():
        out = {}
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            relative = file.relative_to(path)
            if not any(part.startswith(".") for part in relative.parts):
                out[relative.as_posix()] = file_sample(file)
        return out
    return str(location)


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def world_fingerprint(bundle_root: str | os.PathLike | None, device: str) -> str:
    """The offline world's methods share one bundle: its files, and the device kind."""
    from ...world.bundle import bundle_dir

    root = Path(bundle_root) if bundle_root is not None else bundle_dir()
    return fingerprint({"world": path_sample(root), "device": device.split(":")[0]})


def entry_fingerprint(entry, device: str) -> str:
    """A ``models`` entry (:class:`idcraft.model_config.ModelEntry`): what its encoding reads."""
    return fingerprint(
        {
            "method": entry.method,
            "adapter": path_sample(entry.adapter),
            "image_encoder": path_sample(entry.image_encoder),
            "image_encoder_2": path_sample(entry.image_encoder_2),
            "face_backend": entry.face_backend,
            "face_models": path_sample(entry.face_models),
            "dtype": entry.dtype,
            "device": device.split(":")[0],
        }
    )


def catalog_fingerprints(config, catalog) -> dict[str, str]:
    """Method -> fingerprint for everything ``catalog`` serves under ``config``."""
    if catalog.world:
        shared = {}
        out = {}
        for served in catalog:
            kind = served.device.split(":")[0]
            if kind not in shared:
                shared[kind] = world_fingerprint(catalog.world_root, served.device)
            out[served.method] = shared[kind]
        return out
    from ...registry import get_method

    entries = {get_method(entry.method).name: entry for entry in config.models.values()}
    out = {}
    for served in catalog:
        entry = entries.get(served.method)
        if entry is not None:
            out[served.method] = entry_fingerprint(entry, served.device)
        else:  # a catalog built in code, not from the config: the method and device alone
            out[served.method] = fingerprint({"method": served.method, "device": served.device})
    return out
