"""Where ``idcraft serve`` keeps uploaded references and encoded identities, chosen by one setting
(``--store`` / ``server.store``):

* ``memory`` -- this process's memory (the default): fast, gone at a restart, not shared;
* a folder path -- files on a local disk or a shared mount: atomic writes, bounded, kept across restarts;
* ``redis://host:port/db`` -- a Redis server shared by every replica: bounded, kept as long as Redis keeps it.

The identity cache always keeps a hot tier in process memory in front of the folder or Redis
(:class:`~.identity.IdentityCache`); references live on the backend alone (:class:`~.references.ReferenceStore`).
:func:`open_stores` checks the store is there: one that cannot be reached at start is a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import IdcraftError
from ..cache import LRUStore
from .base import BlobStore, StoreUnavailable
from .identity import IdentityCache, StoreHealth
from .memory import MemoryStore
from .references import ReferenceStore

__all__ = ["IdentityCache", "ReferenceStore", "StoreUnavailable", "Stores", "open_stores", "store_kind"]


@dataclass
class Stores:
    references: ReferenceStore
    identities: IdentityCache
    kind: str  # memory | folder | redis
    location: str

    def check(self) -> dict[str, object]:
        """``/readyz``'s view: is each backend reachable now (one round trip each)."""
        out: dict[str, object] = {"kind": self.kind, "location": self.location, "reachable": True}
        backends = [self.references.backend] + ([self.identities.shared] if self.identities.shared else [])
        try:
            for backend in backends:
                backend.ping()
        except StoreUnavailable as exc:
            out.update(reachable=False, error=str(exc))
        return out


def store_kind(spec: str) -> str:
    if spec == "memory":
        return "memory"
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return "redis"
    if "://" in spec:
        raise IdcraftError(
            f"--store {spec}: unknown kind of store; use memory, a folder path or redis://host:port/db."
        )
    return "folder"


def open_stores(server) -> Stores:
    """The stores ``server`` (a :class:`~idcraft.serve.config.ServerConfig`) names, reachable now."""
    spec = str(server.store).strip()
    kind = store_kind(spec)
    health_refs = StoreHealth("reference", server.store_retry_s)
    health_ids = StoreHealth("identity cache", server.store_retry_s)
    hot = LRUStore(server.cache_entries, server.cache_bytes)
    try:
        refs: BlobStore
        shared: BlobStore | None
        if kind == "memory":
            refs, shared = MemoryStore(server.reference_entries, server.reference_bytes), None
        elif kind == "folder":
            from .folder import FolderStore

            refs = FolderStore(spec, "references", server.reference_entries, server.reference_bytes)
            shared = FolderStore(spec, "identities", server.store_cache_entries, server.store_cache_bytes)
        else:
            from .redis_store import RedisStore, connect

            client = connect(spec)
            refs = RedisStore(client, spec, "references", server.reference_entries, server.reference_bytes)
            shared = RedisStore(
                client, spec, "identities", server.store_cache_entries, server.store_cache_bytes
            )
    except StoreUnavailable as exc:
        if kind == "redis" and exc.__cause__ is not None and not isinstance(exc.__cause__, ValueError):
            raise IdcraftError(
                f"cannot reach the Redis store {spec} ({exc.__cause__}): start Redis there or choose "
                "another --store."
            ) from None
        raise IdcraftError(f"cannot open the store {spec}: {exc}") from None
    return Stores(
        ReferenceStore(refs, health_refs), IdentityCache(hot, shared, health_ids), kind, refs.location
    )
