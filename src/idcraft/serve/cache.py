"""Bounded least-recently-used stores in process memory (the ``memory`` store's references, the identity
cache's hot tier; :mod:`.stores` puts them behind one interface with the folder and Redis backends).

The identity cache maps a content hash of (method, reference bytes, options that change encoding) to the
:class:`~idcraft.engine.Conditioning` that :meth:`Engine.encode` made from them, so a second prompt on a
known reference skips the image encoder and face analysis. These stores are bounded by entries and by
bytes (tensors counted by their storage), and safe to use from several threads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any


class LRUStore:
    """At most ``max_entries`` values and ``max_bytes`` bytes; the least recently used go first.
    ``pin`` keeps a value out of eviction (the examples offered by the server)."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._pinned: set[str] = set()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: str, value: Any, size: int | None = None, *, pin: bool = False) -> bool:
        """Store ``value``; False when it alone is over the byte bound (then nothing is stored)."""
        size = nbytes(value) if size is None else size
        with self._lock:
            if pin:
                self._pinned.add(key)
            elif size > self.max_bytes:
                return False
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            self._evict()
            return True

    def _evict(self) -> None:
        for key in list(self._items):
            if len(self._items) <= self.max_entries and self._bytes <= self.max_bytes:
                return
            if key in self._pinned:
                continue
            _, size = self._items.pop(key)
            self._bytes -= size

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes


def identity_key(
    method: str,
    reference_hashes: Sequence[str],
    *,
    s_scale: float = 1.0,
    face_index: int | None = None,
    multi_person: bool = False,
    models: str = "",
    stages: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The cache key of one request's conditioning: everything :meth:`Engine.encode` reads (the method,
    the fingerprint of the models it encodes with, each reference's content hash in order, and the
    options that change encoding, and the content hashes of PuLID's stage inputs, ``stages``: field ->
    one hash per face), hashed. Replicas with the same models make the same keys, so a shared
    store turns one replica's encoding into another's hit."""
    payload: dict[str, Any] = {
        "method": method,
        "models": models,
        "references": list(reference_hashes),
        "s_scale": float(s_scale),
        "face_index": None if face_index is None else int(face_index),  # None (one face only) is not 0
        "multi_person": bool(multi_person),
    }
    if stages:
        payload["stages"] = {name: list(hashes) for name, hashes in stages.items() if hashes}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def nbytes(value: Any, _seen: set[int] | None = None) -> int:
    """Bytes held by ``value``: tensor and array storage, bytes, and the same inside dataclasses,
    mappings and sequences (anything else counts a nominal 64)."""
    seen = set() if _seen is None else _seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if hasattr(value, "element_size") and hasattr(value, "nelement"):  # torch.Tensor
        return int(value.element_size() * value.nelement())
    if hasattr(value, "nbytes") and hasattr(value, "dtype"):  # numpy array
        return int(value.nbytes)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return 64 + sum(nbytes(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return 64 + sum(nbytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return 64 + sum(nbytes(v, seen) for v in value)
    return 64
