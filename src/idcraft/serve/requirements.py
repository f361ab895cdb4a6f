"""The ``serve`` extra, checked before anything is loaded.

``idcraft serve`` without fastapi used to load every model, print its URL as if serving, and only then die
with a ``ModuleNotFoundError`` traceback. :func:`require_server_packages` imports what the server runs on
(cheap next to loading a model) and names the extra to install, in one line.
"""

from __future__ import annotations

import importlib

from ..errors import IdcraftError

INSTALL_HINT = "pip install 'idcraft[serve]'"

#: What the server imports: (import names, any one will do; the pip package providing it).
SERVER_PACKAGES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("fastapi",), "fastapi"),
    (("uvicorn",), "uvicorn"),
    (
        ("python_multipart", "multipart"),
        "python-multipart",
    ),  # FastAPI's form uploads; old releases: multipart
)


def _importable(names: tuple[str, ...]) -> bool:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        return True
    return False


def require_server_packages(command: str = "idcraft serve") -> None:
    """Raise an :class:`~idcraft.errors.IdcraftError` naming the missing packages and the extra to install
    when the server's packages cannot be imported."""
    missing = [package for names, package in SERVER_PACKAGES if not _importable(names)]
    if missing:
        raise IdcraftError(
            f"{command} needs {', '.join(missing)}, which cannot be imported; install the serve extra: "
            f"{INSTALL_HINT}"
        )
