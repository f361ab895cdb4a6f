"""A disk cache of frozen-encoder features, so epochs after the first never run the image encoder.

The encoder is frozen and its input is not augmented, so a reference's features are the same every
epoch. They are computed once, in chunks of the (ordered) sample list, and written as safetensors shards
``features-<hash of the chunk's keys>.safetensors`` under the cache folder: one tensor per reference,
named by :meth:`~idcraft.training.data.Record.reference_key` (path, size, mtime). A chunk's shard either
exists whole (written atomically) or not at all, so a run killed while caching resumes with the chunks
it lacks, each computed with the same batch composition as before: the cache's contents do not depend on
when it was built. ``meta.json`` names the encoder and feature kind; a different one empties the cache.

References that cannot be read are recorded in their shard's metadata and leave the run (reported).
With several processes, chunk ``c`` is computed by process ``c % world``; all then read every shard.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open

from ..errors import ImageError
from ..images import load_image
from ..outputs import save_safetensors
from .data import Record, SkipReport

SHARD_GLOB = "features-*.safetensors"


def claim_cache_dir(directory: Path, fingerprint: dict, entries: str) -> None:
    """Make ``directory`` a cache for ``fingerprint``: entries (``entries`` glob) left by a cache with a
    different fingerprint (another encoder, face backend ...) are deleted, then the fingerprint is
    recorded in ``meta.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = directory / "meta.json"
    if meta.is_file():
        try:
            same = json.loads(meta.read_text()) == fingerprint
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            for entry in directory.glob(entries):
                entry.unlink()
    meta.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))


class FeatureLookup:
    """``record -> cached features`` (or ``None``), reading shards lazily; picklable for DataLoader workers
    (open file handles are not carried across)."""

    def __init__(self, index: dict[str, str]):
        self.index = index
        self._handles: dict[str, object] = {}

    def __call__(self, record: Record) -> torch.Tensor | None:
        key = record.reference_key()
        shard = self.index.get(key)
        if shard is None:
            return None
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(shard, framework="pt", device="cpu")
        return handle.get_tensor(key)

    def __getstate__(self) -> dict:
        return {"index": self.index, "_handles": {}}


class FeatureCache:
    """Build and read the shards of one cache folder for one encoder configuration."""

    def __init__(self, directory: Path, fingerprint: dict, chunk_size: int = 256):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.chunk_size = chunk_size

    def prepare(self, is_main: bool) -> None:
        """Create the folder; drop shards made for another encoder or feature kind (main process only)."""
        if is_main:
            claim_cache_dir(self.directory, self.fingerprint, SHARD_GLOB)

    def chunks(self, records: Sequence[Record]) -> list[list[tuple[str, str]]]:
        """Unique ``(key, reference path)`` pairs in first-seen order, cut into chunks."""
        seen: dict[str, str] = {}
        for record in records:
            seen.setdefault(record.reference_key(), record.reference_path)
        pairs = list(seen.items())
        return [pairs[i : i + self.chunk_size] for i in range(0, len(pairs), self.chunk_size)]

    def shard_path(self, chunk: list[tuple[str, str]]) -> Path:
        digest = hashlib.sha1("\n".join(key for key, _ in chunk).encode()).hexdigest()[:20]
        return self.directory / f"features-{digest}.safetensors"

    def build(
        self,
        records: Sequence[Record],
        preprocess: Callable[[Image.Image], dict[str, torch.Tensor]],
        encode: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        *,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Compute this process's missing chunks."""
        for number, chunk in enumerate(self.chunks(records)):
            if number % world != rank:
                continue
            path = self.shard_path(chunk)
            if not path.is_file():
                self._write_chunk(path, chunk, preprocess, encode, batch_size)
            if progress is not None:
                progress(len(chunk))

    def _write_chunk(self, path: Path, chunk, preprocess, encode, batch_size: int) -> None:
        tensors: dict[str, torch.Tensor] = {}
        bad: dict[str, str] = {}
        good: list[tuple[str, dict[str, torch.Tensor]]] = []
        for key, reference in chunk:
            try:
                good.append((key, preprocess(load_image(reference))))
            except ImageError as exc:
                bad[key] = str(exc)
        for start in range(0, len(good), batch_size):
            part = good[start : start + batch_size]
            inputs = {name: torch.stack([item[name] for _, item in part]) for name in part[0][1]}
            with torch.no_grad():
                features = encode(inputs).detach().cpu()
            for (key, _), feature in zip(part, features, strict=True):
                tensors[key] = feature.clone().contiguous()
        tmp = path.with_name(f".{path.name}.tmp")
        save_safetensors(tensors, str(tmp), metadata={"bad": json.dumps(bad)})
        tmp.replace(path)

    def load(self, records: Sequence[Record], report: SkipReport) -> tuple[list[Record], FeatureLookup]:
        """Records whose reference has features (the rest are reported) and the lookup serving them."""
        index: dict[str, str] = {}
        bad: dict[str, str] = {}
        for chunk in self.chunks(records):
            path = self.shard_path(chunk)
            with safe_open(str(path), framework="pt", device="cpu") as f:
                bad.update(json.loads((f.metadata() or {}).get("bad", "{}")))
                index.update({key: str(path) for key in f.keys()})
        kept = []
        for record in records:
            key = record.reference_key()
            if key in index:
                kept.append(record)
            else:
                report.skip(
                    record.image, bad.get(key, f"reference {record.reference_path}: no cached features")
                )
        return kept, FeatureLookup(index)
