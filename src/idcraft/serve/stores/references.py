"""Uploaded references (``POST /v1/references``) by content hash, on the configured backend.

The examples the server offers are pinned in this process (every replica makes the same ones at start),
so they are there whatever the backend evicts or however it fails. A backend failure while serving is a
503 with Retry-After: a request that names an uploaded reference cannot be served without its bytes.
"""

from __future__ import annotations

import threading

from ..errors import ApiError
from .base import BlobStore, StoreUnavailable
from .identity import StoreHealth


class ReferenceStore:
    def __init__(self, backend: BlobStore, health: StoreHealth):
        self.backend = backend
        self.health = health
        self._pinned: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        pinned = self._pinned.get(key)
        if pinned is not None:
            return pinned
        return self._call(lambda: self.backend.get(key))

    def put(self, key: str, data: bytes, *, pin: bool = False) -> bool:
        if pin:
            with self._lock:
                self._pinned[key] = data
            return True
        return self._call(lambda: self.backend.put(key, data))

    def _call(self, action):
        try:
            result = action()
        except StoreUnavailable as exc:
            self.health.failed(exc)
            raise ApiError(
                503,
                "unavailable",
                f"the reference store ({self.backend.location}) cannot be reached now; try again shortly.",
                headers={"Retry-After": str(max(1, round(self.health.retry_s)))},
            ) from exc
        self.health.recovered()
        return result

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return len(self._pinned) + self._stats()[0]

    @property
    def bytes(self) -> int:
        return sum(len(v) for v in self._pinned.values()) + self._stats()[1]

    def _stats(self) -> tuple[int, int]:
        try:
            return self.backend.stats()
        except StoreUnavailable:
            return 0, 0
