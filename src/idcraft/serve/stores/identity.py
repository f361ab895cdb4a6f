"""The identity cache in two tiers: this process's hot LRU of live conditionings in front of a shared
store (a folder or Redis) of their safetensors bytes.

A lookup tries the hot tier, then the shared one (a hit there is decoded and kept hot); a new encoding is
kept in both. The shared tier is an optimisation, never a reason to fail: when it errors the cache warns
once, counts it (``idcraft_store_errors_total{store="identity"}``) and leaves that tier alone for
``retry_s`` seconds, answering from the hot tier or as a miss meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ...engine import Conditioning
from ..cache import LRUStore
from . import codec
from .base import BlobStore, StoreUnavailable

log = logging.getLogger("idcraft.serve")


class StoreHealth:
    """When a store last failed, and how often: the back-off and the metric, shared by both stores."""

    def __init__(self, name: str, retry_s: float):
        self.name = name
        self.retry_s = retry_s
        self.errors = 0
        self._down_until = 0.0
        self._lock = threading.Lock()

    def usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, exc: Exception) -> None:
        with self._lock:
            self.errors += 1
            first = time.monotonic() >= self._down_until
            self._down_until = time.monotonic() + self.retry_s
        if first:
            log.warning("%s store: %s; going on without it for %.0f s", self.name, exc, self.retry_s)

    def recovered(self) -> None:
        self._down_until = 0.0


class IdentityCache:
    """``lookup(key, device)`` -> (conditioning or None, ``"hot"``/``"shared"``/None); ``put(key, c)``."""

    def __init__(self, hot: LRUStore, shared: BlobStore | None, health: StoreHealth):
        self.hot = hot
        self.shared = shared
        self.health = health
        self.shared_hits = 0
        self._lock = threading.Lock()

    def lookup(self, key: str, device: Any = None) -> tuple[Conditioning | None, str | None]:
        value = self.hot.get(key)
        if value is not None:
            return value, "hot"
        if self.shared is None or not self.health.usable():
            return None, None
        try:
            data = self.shared.get(key)
        except StoreUnavailable as exc:
            self.health.failed(exc)
            return None, None
        if data is None:
            return None, None
        try:
            value = codec.decode(data, device)
        except Exception as exc:  # a foreign or damaged entry: encode again, overwrite it
            log.warning("identity cache: entry %s unreadable (%s); encoding again", key[:12], exc)
            return None, None
        self.hot.put(key, value)
        with self._lock:
            self.shared_hits += 1
        return value, "shared"

    def get(self, key: str, device: Any = None) -> Conditioning | None:
        """The conditioning alone, from either tier (as :class:`~idcraft.serve.cache.LRUStore.get`)."""
        return self.lookup(key, device)[0]

    def put(self, key: str, conditioning: Conditioning) -> None:
        self.hot.put(key, conditioning)
        if self.shared is None or not self.health.usable():
            return
        try:
            data = codec.encode(conditioning)
        except codec.CodecError as exc:
            log.warning(
                "identity cache: %s conditioning kept in this process only (%s)", conditioning.method, exc
            )
            return
        try:
            self.shared.put(key, data)
        except StoreUnavailable as exc:
            self.health.failed(exc)

    # what the gauges and /healthz read (the hot tier: the shared one is the store's own business)
    def __len__(self) -> int:
        return len(self.hot)

    @property
    def bytes(self) -> int:
        return self.hot.bytes
