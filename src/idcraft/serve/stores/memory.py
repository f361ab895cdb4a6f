"""The ``memory`` backend: this process's own bounded LRU (today's behaviour; gone at a restart)."""

from __future__ import annotations

from ..cache import LRUStore


class MemoryStore:
    """A :class:`~idcraft.serve.cache.LRUStore` of bytes behind the :class:`~.base.BlobStore` interface."""

    location = "memory"

    def __init__(self, max_entries: int, max_bytes: int):
        self._lru = LRUStore(max_entries, max_bytes)

    def get(self, key: str) -> bytes | None:
        return self._lru.get(key)

    def put(self, key: str, data: bytes) -> bool:
        return self._lru.put(key, data, len(data))

    def ping(self) -> None:
        return None

    def stats(self) -> tuple[int, int]:
        return len(self._lru), self._lru.bytes
