"""The folder backend: one file per key on a local disk or a shared mount (NFS, a Kubernetes volume).

Files are written atomically (temporary file, fsync, rename: :func:`idcraft.outputs.atomic_write_bytes`),
so a reader on another replica sees a whole file or none, and a crash leaves no half file under a key.
A file's modification time is its last use (a read touches it), and when a write takes the namespace
over its bounds the least recently used files are deleted. Several processes may share the folder: each
counts what it wrote since its last scan and rescans (one ``stat`` per file) only when over a bound.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ...errors import OutputError
from ...outputs import atomic_write_bytes
from .base import StoreUnavailable, check_key


class FolderStore:
    def __init__(self, root: str | os.PathLike, namespace: str, max_entries: int, max_bytes: int):
        self.root = Path(root).expanduser()
        self.folder = self.root / namespace
        self.location = str(self.root)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(
                f"the store folder {self.root} cannot be created ({exc.strerror or exc}): pick a writable "
                "folder for --store."
            ) from exc
        self.ping()
        self._entries, self._bytes = self._totals(self._scan())

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.folder / key[:2] / key

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {path} ({exc.strerror or exc}).") from exc
        try:
            os.utime(path)  # a read is a use: last to be evicted
        except OSError:
            pass  # deleted by another replica's eviction meanwhile: the bytes read are still whole
        return data

    def put(self, key: str, data: bytes) -> bool:
        if len(data) > self.max_bytes:
            return False
        path = self._path(key)
        if path.exists():  # content-addressed: the same key holds the same bytes
            try:
                os.utime(path)
                return True
            except OSError:
                pass
        try:
            atomic_write_bytes(path, data)
        except OutputError as exc:
            raise StoreUnavailable(str(exc)) from exc
        with self._lock:
            self._entries += 1
            self._bytes += len(data)
            if self._entries > self.max_entries or self._bytes > self.max_bytes:
                self._evict()
        return True

    def _scan(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every kept file; temporary files of writes in progress are skipped."""
        out = []
        try:
            shards = list(os.scandir(self.folder))
        except OSError as exc:
            raise StoreUnavailable(f"cannot list {self.folder} ({exc.strerror or exc}).") from exc
        for shard in shards:
            if not shard.is_dir() or shard.name.startswith("."):
                continue
            try:
                files = list(os.scandir(shard.path))
            except OSError:
                continue
            for entry in files:
                if entry.name.startswith("."):
                    continue
                try:
                    info = entry.stat()
                except OSError:  # deleted meanwhile
                    continue
                out.append((info.st_mtime, info.st_size, Path(entry.path)))
        return out

    @staticmethod
    def _totals(files: list[tuple[float, int, Path]]) -> tuple[int, int]:
        return len(files), sum(size for _, size, _ in files)

    def _evict(self) -> None:
        """Delete the least recently used files until the namespace is within its bounds (lock held)."""
        files = sorted(self._scan(), key=lambda item: item[0])
        entries, total = self._totals(files)
        for _, size, path in files:
            if entries <= self.max_entries and total <= self.max_bytes:
                break
            try:
                path.unlink()
            except FileNotFoundError:
                pass  # another replica evicted it
            except OSError:
                continue
            entries -= 1
            total -= size
        self._entries, self._bytes = entries, total

    def ping(self) -> None:
        probe = self.folder / f".ping.{os.getpid()}.{threading.get_ident()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreUnavailable(
                f"the store folder {self.root} is not writable ({exc.strerror or exc})."
            ) from exc

    def stats(self) -> tuple[int, int]:
        with self._lock:
            return self._entries, self._bytes
