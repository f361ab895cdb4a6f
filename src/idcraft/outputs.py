"""Writing what the user asked for: never half a file, never an unasked overwrite, never a surprise name.

Every user-facing output (generated images, embeddings, notes) goes through here:

* :func:`check_output_path` runs *before* any model is loaded, so a bad ``--output`` fails in a second,
  not after minutes of loading and sampling: an existing file is refused unless ``overwrite`` (the message
  says to pass ``--overwrite``), a directory is refused, a folder that cannot be created or written to is
  refused (checked by creating a temporary file there), and an image path must end in a supported
  extension (:data:`IMAGE_FORMATS`);
* the ``atomic_*`` writers encode into a temporary file in the destination folder, ``fsync`` it and
  ``os.replace`` it over the destination, so a crash, a full disk or an encoder error leaves either the
  old file or the new one, and no temporary file behind; the file gets the mode ``open()`` would give it
  (``0o666`` less the umask: 0644 under umask 022), not ``mkstemp``'s private 0600
  (:func:`temporary_file`, also used for adapter checkpoints);
* :func:`numbered_paths` names several images ``NAME-0.ext``, ``NAME-1.ext`` ... keeping the extension.

The image format follows the extension: ``--output o.jpg`` writes a JPEG named ``o.jpg``.

No torch import here: the command line checks its outputs before importing the model stack.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import OutputError

#: Image file extensions and the Pillow format each one writes.
IMAGE_FORMATS: dict[str, str] = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
#: Encoder settings per format: JPEG at quality 95 (4:4:4 would be larger for little gain), lossless PNG.
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}, "PNG": {}}


def image_format(path: str | os.PathLike) -> str:
    """The Pillow format ``path``'s extension names (``PNG``, ``JPEG``, ``WEBP``); an unknown or missing
    extension is an :class:`~idcraft.errors.OutputError` naming the supported ones."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        supported = ", ".join(IMAGE_FORMATS)
        found = f"extension {suffix!r}" if suffix else "no extension"
        raise OutputError(
            f"{path}: cannot tell which image format to write ({found}); use one of {supported} "
            f"(e.g. {Path(path).with_suffix('.png').name})."
        )
    return IMAGE_FORMATS[suffix]


def numbered_paths(output: str | os.PathLike, count: int) -> list[Path]:
    """``[output]`` for one file; ``NAME-0.ext``, ``NAME-1.ext`` ... (extension kept) for several."""
    path = Path(output)
    if count <= 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def check_output_path(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    image: bool = False,
    flag: str = "--output",
) -> Path:
    """Check, before any work is done, that ``path`` can be written; returns it as a :class:`Path`.

    Refused (:class:`~idcraft.errors.OutputError`): a directory; an existing file unless ``overwrite``;
    a folder that cannot be created or is not writable (tried by creating a temporary file in it, which
    also catches read-only file systems and permissions the mode bits do not show); with ``image``, an
    extension that names no supported image format. Nothing is left on disk: a missing folder is not
    created (the nearest existing folder above it must be writable); the writers create it.
    """
    path = Path(path).expanduser()
    if image:
        image_format(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a directory; give a file name inside it instead.")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputError(
                f"{flag} {path}: the file already exists; pass --overwrite to replace it, or choose another "
                "name."
            )
        if not path.is_file():
            raise OutputError(f"{flag} {path}: exists and is not a regular file; choose another name.")
    check_writable_folder(path.parent, flag=flag, target=path, create=False)
    return path


def check_output_paths(
    output: str | os.PathLike,
    count: int,
    *,
    overwrite: bool = False,
    image: bool = True,
    flag: str = "--output",
) -> list[Path]:
    """:func:`check_output_path` for each of :func:`numbered_paths` ``(output, count)``."""
    if Path(output).expanduser().is_dir():
        raise OutputError(f"{flag} {output}: is a directory; give a file name inside it instead.")
    if image:
        image_format(output)
    return [
        check_output_path(p, overwrite=overwrite, image=image, flag=flag)
        for p in numbered_paths(output, count)
    ]


def check_writable_folder(
    folder: str | os.PathLike, *, flag: str = "--output", target: Path | None = None, create: bool = True
) -> Path:
    """Create ``folder`` if needed (``create``; else check the nearest existing folder above it, leaving
    nothing behind) and prove it writable by creating (and removing) a temporary file."""
    folder = Path(folder) if str(folder) else Path(".")
    where = f"{flag} {target if target is not None else folder}"
    if not create:  # prove the nearest existing folder writable; nothing is left on disk
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            raise OutputError(f"{where}: cannot create folder {folder}: {existing} is a file.")
        folder = existing
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise OutputError(
            f"{where}: cannot create folder {folder}: a file of that name is in the way."
        ) from exc
    except OSError as exc:
        raise OutputError(f"{where}: cannot create folder {folder} ({exc.strerror or exc}).") from exc
    if not folder.is_dir():
        raise OutputError(f"{where}: {folder} is not a folder.")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".idcraft-write-test-"):
            pass
    except OSError as exc:
        raise OutputError(
            f"{where}: folder {folder} is not writable ({exc.strerror or exc}); choose another place."
        ) from exc
    return folder


# ---------------------------------------------------------------------------- atomic writes
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux's
    ``/proc/self/status``); elsewhere set and put back at once, under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it; other threads' files meanwhile: 0o077
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits ``open(path, "w")`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def temporary_file(folder: Path, name: str) -> tuple[int, Path]:
    """A new temporary file beside the final ``folder/name`` (an open descriptor and its path), with the
    mode a plain ``open()`` would give the final file: ``mkstemp`` makes it 0600 for its own privacy, and
    the rename would carry that over to the user's output."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, new_file_mode())
        else:  # Windows before Python 3.13: only the read-only bit means anything there
            os.chmod(tmp, new_file_mode())
    except OSError:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, Path(tmp)


@contextlib.contextmanager
def _atomic(path: Path, *, overwrite: bool, binary: bool = True) -> Iterator[IO]:
    """An open temporary file beside ``path``; on success it is flushed, fsynced and renamed over ``path``,
    on any error removed (``path`` untouched)."""
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; cannot write a file there.")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise OutputError(f"{path}: the file already exists; pass --overwrite to replace it.")
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = temporary_file(folder, path.name)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}.") from exc
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}.") from exc
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable where the platform allows (POSIX); best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[bytes]], object], *, overwrite: bool = True
) -> Path:
    """Call ``write(file)`` on a temporary file and move it to ``path`` only when it returned."""
    path = Path(path)
    with _atomic(path, overwrite=overwrite) as handle:
        write(handle)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    return atomic_write(path, lambda f: f.write(data), overwrite=overwrite)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_save_image(image, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a PIL image (or an ``[H, W, 3]`` uint8 array) atomically in the format its extension names:
    ``.png``, ``.jpg``/``.jpeg`` (RGB, quality 95), ``.webp``. An existing file is refused unless
    ``overwrite``; a failed encode leaves any existing file untouched and no temporary file."""
    from PIL import Image

    path = Path(path)
    fmt = image_format(path)
    if not isinstance(image, Image.Image):
        import numpy as np

        image = Image.fromarray(np.asarray(image))
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    elif fmt == "WEBP" and image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    options = _SAVE_OPTIONS[fmt]
    return atomic_write(path, lambda f: image.save(f, format=fmt, **options), overwrite=overwrite)


def atomic_save_npy(array, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``numpy.save`` ``array`` to ``path`` (which must end in ``.npy``) atomically, no pickles."""
    import numpy as np

    path = Path(path)
    if path.suffix.lower() != ".npy":
        raise OutputError(f"{path}: a NumPy array file must end in .npy.")
    return atomic_write(
        path, lambda f: np.save(f, np.asarray(array), allow_pickle=False), overwrite=overwrite
    )


# ---------------------------------------------------------------------------- libraries' writers
def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or every file under a folder) the mode ``open()`` would have given it.

    For files written by libraries that create them privately: safetensors writes 0600 whatever the
    umask, and so do diffusers' and transformers' ``save_pretrained``, which use it."""
    path = Path(path)
    mode = new_file_mode()
    for file in [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(file, mode)


def save_safetensors(tensors: dict, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` with the mode ``open()`` would give (see :func:`follow_umask`)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    follow_umask(path)
    return Path(path)
