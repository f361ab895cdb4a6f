"""Importing the optional face-analysis packages with an actionable error.

The core package must import (and ``idcraft generate`` with plain IP-Adapter must run) without any of the
face-analysis dependencies, so every backend imports them here, at the moment it is built.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import FaceError

INSTALL_HINT = "Install the face-analysis extras with: pip install 'idcraft[faces]'"


def import_optional(module: str, package: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise a :class:`FaceError` naming the pip ``package`` that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise FaceError(
            f"{purpose} needs the Python package {package!r}, which cannot be imported ({exc}). "
            f"{INSTALL_HINT}"
        ) from exc


def cv2() -> ModuleType:
    """OpenCV, used for the affine warps and drawing that must match insightface/InstantID pixel for pixel."""
    return import_optional("cv2", "opencv-python-headless", "Face alignment and keypoint drawing")
