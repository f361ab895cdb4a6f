"""A world bundle as a few float16 archives, and back: ``idcraft world pack`` / ``idcraft world unpack``.

A build on a borrowed GPU can bring back only a few files of bounded size (the device tool: at most 8
files of at most 16 MiB each). :func:`pack_bundle` writes the bundle's current state as uncompressed tar
archives of at most :data:`MAX_PART_BYTES` each -- every ``.safetensors`` file with its float32 tensors
stored as float16 (half the bytes; float16 keeps the models' weights to about three significant digits),
every other file as it is -- and :func:`unpack_bundle` restores a bundle folder from them that the usual
loaders read (float32 again by default; ``float16=True`` keeps the smaller files, which diffusers,
transformers and the world's own loaders all read into float32 models).

``idcraft world build --pack DIR`` repacks after every finished stage, so a run cut off early still has
everything that finished. Each repack is a new *generation* ``world-bundle-g<N>-<i>of<k>.tar``: its parts
are written under temporary names and renamed, then the previous generation is deleted, so at any moment
the folder holds at least one complete generation; :func:`unpack_bundle` takes the newest complete one.

Inside every part, ``PACK.json`` lists the whole generation: each file's path, size, SHA-256 (of the
stored bytes) and the members holding it (``files/<path>`` whole, or ``chunks/<path>.<j>`` where a file
larger than a part is split across consecutive parts).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import IdcraftError

PREFIX = "world-bundle"
#: The largest archive written (the device tool's limit per file).
MAX_PART_BYTES = 16 * 2**20
#: The most archives one generation may have: with the build log beside them, the device tool's 8 files.
MAX_PARTS = 7
PACK_INFO = "PACK.json"
#: Metadata key of a packed safetensors file: the names of the tensors stored as float16 (were float32).
CONVERTED_KEY = "idcraft_pack_float32"
#: Files kept in float32 (statistics whose calibration float16 would disturb).
KEEP_FLOAT32 = ("identity/familiarity.safetensors",)
#: Under ``work/`` only these travel: the VAE stage's output (a continued build skips the stage).
WORK_KEPT = ("work/vae/",)
#: Room kept in each part for tar headers, ``PACK.json`` and the end-of-archive records.
_OVERHEAD = 256 * 1024
_PART = re.compile(rf"^{PREFIX}-g(\d+)-(\d+)of(\d+)\.tar$")


def bundle_files(root: str | os.PathLike) -> list[str]:
    """The paths (relative, ``/``-separated, sorted) of a bundle folder's files that a pack holds: every
    file but temporary ones and ``work/`` (renders, datasets, runs), except :data:`WORK_KEPT`."""
    root = Path(root)
    out = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        if rel.endswith((".tmp", ".partial")) or "/." in f"/{rel}":
            continue
        if rel.startswith("work/") and not rel.startswith(WORK_KEPT):
            continue
        out.append(rel)
    return out


def float16_bytes(path: str | os.PathLike, rel: str = "") -> bytes:
    """The safetensors file at ``path`` with its float32 tensors as float16 (those whose values float16
    cannot hold, and files in :data:`KEEP_FLOAT32`, unchanged); the converted names are recorded in the
    file's metadata under :data:`CONVERTED_KEY` so :func:`unpack_bundle` can restore float32."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save

    if rel in KEEP_FLOAT32:
        return Path(path).read_bytes()
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    converted = []
    for name, tensor in tensors.items():
        if tensor.dtype == torch.float32 and (tensor.numel() == 0 or float(tensor.abs().max()) <= 65000.0):
            tensors[name] = tensor.to(torch.float16)
            converted.append(name)
    if not converted:
        return Path(path).read_bytes()
    metadata[CONVERTED_KEY] = json.dumps(sorted(converted))
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def float32_bytes(data: bytes) -> bytes:
    """A packed safetensors file's bytes with the tensors :func:`float16_bytes` converted back to float32
    (and its marker removed); files it did not convert come back unchanged."""
    import torch
    from safetensors.torch import load, save

    tensors = load(data)
    # safetensors.torch.load gives no metadata: read the header
    header_len = int.from_bytes(data[:8], "little")
    metadata = dict(json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {})
    names = json.loads(metadata.pop(CONVERTED_KEY, "[]"))
    if not names:
        return data
    for name in names:
        tensors[name] = tensors[name].to(torch.float32)
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata or None)


def _generations(folder: Path) -> dict[int, dict[int, tuple[int, Path]]]:
    """``{generation: {part index: (part count, path)}}`` of the archives in ``folder``."""
    found: dict[int, dict[int, tuple[int, Path]]] = {}
    if not folder.is_dir():
        return found
    for path in folder.iterdir():
        match = _PART.match(path.name)
        if match:
            gen, index, count = (int(g) for g in match.groups())
            found.setdefault(gen, {})[index] = (count, path)
    return found


def _complete(parts: dict[int, tuple[int, Path]]) -> bool:
    counts = {count for count, _ in parts.values()}
    return len(counts) == 1 and set(parts) == set(range(1, counts.pop() + 1))


def pack_bundle(
    root: str | os.PathLike,
    output: str | os.PathLike,
    *,
    max_part_bytes: int = MAX_PART_BYTES,
    max_parts: int = MAX_PARTS,
    files: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Write bundle folder ``root`` into ``output`` as a new generation of float16 archives (see the module
    notes) and delete the older generations; returns what the generation's ``PACK.json`` says, plus
    ``paths`` (the archives) and ``seconds``. Raises :class:`IdcraftError` (writing nothing) when the
    bundle needs more than ``max_parts`` archives."""
    started = time.perf_counter()
    root, output = Path(root), Path(output)
    if not root.is_dir():
        raise IdcraftError(f"{root}: no bundle folder to pack.")
    names = list(bundle_files(root) if files is None else files)
    stored: list[tuple[str, bytes]] = []
    for rel in names:
        path = root / rel
        data = float16_bytes(path, rel) if rel.endswith(".safetensors") else path.read_bytes()
        stored.append((rel, data))
    capacity = max_part_bytes - _OVERHEAD
    if capacity <= 0:
        raise IdcraftError(f"max_part_bytes {max_part_bytes}: too small for an archive.")

    # the files as one stream cut into parts (the fewest parts): a file that fits in what is left of the
    # current part goes in whole, else it is cut into chunks over consecutive parts; each member costs a
    # header block and at most one block of padding (1024 bytes counted)
    layout: list[list[tuple[str, bytes]]] = [[]]  # per part: (member, bytes)
    room = capacity
    index: list[dict[str, Any]] = []
    for rel, data in stored:
        entry = {"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "members": []}
        if len(data) + 1024 <= room:
            layout[-1].append((f"files/{rel}", data))
            entry["members"].append([len(layout), f"files/{rel}"])
            room -= len(data) + 1024
        else:
            offset, j = 0, 0
            while offset < len(data) or j == 0:
                if room <= 4096:
                    layout.append([])
                    room = capacity
                take = min(len(data) - offset, room - 1024)
                member = f"chunks/{rel}.{j:03d}"
                layout[-1].append((member, data[offset : offset + take]))
                entry["members"].append([len(layout), member])
                room -= take + 1024
                offset += take
                j += 1
        index.append(entry)
    count = len(layout)
    if count > max_parts:
        total = sum(len(d) for _, d in stored)
        raise IdcraftError(
            f"{root}: the bundle needs {count} archives of {max_part_bytes / 2**20:.0f} MiB "
            f"({total / 2**20:.1f} MiB in float16), more than the {max_parts} allowed."
        )

    output.mkdir(parents=True, exist_ok=True)
    older = _generations(output)
    generation = max(older, default=0) + 1
    record_path = root / "BUILD.json"
    stages = sorted(json.loads(record_path.read_text()).get("stages", {})) if record_path.is_file() else []
    info = {
        "format": "idcraft-world-pack/1",
        "generation": generation,
        "parts": count,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stages": stages,
        "bytes": sum(e["size"] for e in index),
        "files": index,
    }
    info_bytes = (json.dumps(info, indent=1) + "\n").encode()
    paths = []
    for k, members in enumerate(layout, start=1):
        final = output / f"{PREFIX}-g{generation:03d}-{k}of{count}.tar"
        tmp = final.with_name(final.name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, PACK_INFO, info_bytes)
            for member, data in members:
                _add(tar, member, data)
        size = tmp.stat().st_size
        if size > max_part_bytes:
            tmp.unlink()
            raise IdcraftError(f"{final.name}: {size} bytes, over {max_part_bytes} (a bug).")
        os.replace(tmp, final)
        paths.append(final)
    for parts in older.values():  # the new generation is complete: the older ones can go
        for _, path in parts.values():
            path.unlink(missing_ok=True)
    return {**info, "paths": [str(p) for p in paths], "seconds": round(time.perf_counter() - started, 2)}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    member.mtime = 0
    member.mode = 0o644
    tar.addfile(member, io.BytesIO(data))


def find_generation(source: str | os.PathLike) -> tuple[int, list[Path]]:
    """The newest complete generation of archives in folder ``source``: its number and its parts in
    order. Raises :class:`IdcraftError` when there is none."""
    folder = Path(source)
    generations = _generations(folder)
    for gen in sorted(generations, reverse=True):
        parts = generations[gen]
        if _complete(parts):
            return gen, [parts[i][1] for i in sorted(parts)]
    if not folder.is_dir():
        raise IdcraftError(f"{folder}: no such folder.")
    raise IdcraftError(f"{folder}: no complete set of {PREFIX}-g<N>-<i>of<k>.tar archives.")


def unpack_bundle(
    source: str | os.PathLike, output: str | os.PathLike, *, float16: bool = False
) -> dict[str, Any]:
    """Restore a bundle folder ``output`` from the newest complete generation of archives in ``source``
    (see the module notes): every file checked against its size and SHA-256, safetensors files back in
    float32 unless ``float16``. Returns the generation's ``PACK.json`` contents plus ``written`` (the
    files) and ``seconds``."""
    import torch  # noqa: F401  (safetensors.torch needs it; fail here with a clear import error)

    started = time.perf_counter()
    generation, parts = find_generation(source)
    tars = [tarfile.open(p, "r") for p in parts]
    try:
        info = json.loads(tars[0].extractfile(PACK_INFO).read())
        if info.get("generation") != generation or info.get("parts") != len(parts):
            raise IdcraftError(f"{parts[0]}: its {PACK_INFO} does not describe generation {generation}.")
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for entry in info["files"]:
            data = b"".join(tars[part - 1].extractfile(member).read() for part, member in entry["members"])
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise IdcraftError(f"{entry['path']}: damaged in the archives (size or checksum differs).")
            if entry["path"].endswith(".safetensors") and not float16:
                data = float32_bytes(data)
            target = out / entry["path"]
            if not target.resolve().is_relative_to(out.resolve()):
                raise IdcraftError(f"{entry['path']}: a path outside the bundle folder.")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".partial")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            written.append(entry["path"])
    finally:
        for tar in tars:
            tar.close()
    return {**info, "written": written, "seconds": round(time.perf_counter() - started, 2)}
