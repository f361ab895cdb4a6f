"""What every store backend offers: bytes kept under a hex key, bounded, and a check that it is there.

Two stores sit on a backend (:mod:`.references` and :mod:`.identity`), each in its own namespace. A backend
that cannot be reached raises :class:`StoreUnavailable`; at start that is the one-line error the user sees,
while serving the identity cache turns it into a miss (see :class:`~.identity.IdentityCache`).
"""

from __future__ import annotations

import re
from typing import Protocol

from ...errors import IdcraftError

#: Keys are SHA-256 hex digests (content hashes, identity keys): safe as file names and Redis keys.
KEY = re.compile(r"[0-9a-f]{64}")


class StoreUnavailable(IdcraftError):
    """The store cannot be read or written now (Redis down, a mount gone, a full disk)."""


class BlobStore(Protocol):
    """Bytes by key, bounded by entries and bytes; the least recently used go first."""

    #: Where it keeps things, for messages and ``/readyz`` (``memory``, a folder, a Redis URL).
    location: str

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> bool:
        """Keep ``data``; False when it alone is over the byte bound (then nothing is kept)."""
        ...

    def ping(self) -> None:
        """Return when the store can be used now, else raise :class:`StoreUnavailable`."""
        ...

    def stats(self) -> tuple[int, int]:
        """(entries, bytes) kept now."""
        ...


def check_key(key: str) -> str:
    if not KEY.fullmatch(key):
        raise ValueError(f"store keys are SHA-256 hex digests, not {key!r}")
    return key
