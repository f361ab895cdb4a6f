"""Method families as components: one module per family, found by the registry's ``family`` field.

| module | family | methods |
|---|---|---|
| :mod:`.ip_adapter` | IP-Adapter | ip-adapter, ip-adapter-plus, ip-adapter-plus-face, ip-adapter-full-face |
| :mod:`.faceid` | IP-Adapter-FaceID | faceid, faceid-plus, faceid-plusv2, faceid-portrait |
| :mod:`.instantid` | InstantID | instantid |
| :mod:`.instantcharacter` | InstantCharacter | instantcharacter |
| :mod:`.text_only` | none (the base model alone) | none |
| :mod:`.infiniteyou` | InfiniteYou | infiniteyou |
| :mod:`.pulid` | PuLID (SDXL) | pulid |
| :mod:`.pulid_flux` | PuLID-FLUX | pulid-flux |

Each module defines ``FAMILY``, a :class:`~.base.Family`: load from official files, make fresh for
training, references -> conditioning, run the pipeline. :class:`idcraft.engine.Engine` dispatches through
:func:`family_of`; adding a method is a registry entry (and, for a new family, one module here).
"""

from __future__ import annotations

import importlib

from ..registry import Method, get_method
from .base import FaceSettings, Family

__all__ = ["FaceSettings", "Family", "family_of"]

#: Family name -> the module that implements it.
FAMILY_MODULES = {
    "ip-adapter": "ip_adapter",
    "faceid": "faceid",
    "instantid": "instantid",
    "instantcharacter": "instantcharacter",
    "none": "text_only",
    "infiniteyou": "infiniteyou",
    "pulid": "pulid",
    "pulid-flux": "pulid_flux",
}


def family_of(method: str | Method) -> Family:
    """The component that loads and runs ``method`` (a name, alias or :class:`Method`)."""
    method = get_method(method) if isinstance(method, str) else method
    return importlib.import_module(f"{__name__}.{FAMILY_MODULES[method.family]}").FAMILY


def reads_faces(method: str | Method | None) -> bool:
    """Whether ``method`` finds a face in its reference photos (and so reads ``face_index``)."""
    return method is not None and "face_index" in family_of(method).options
