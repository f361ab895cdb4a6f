"""IP-Adapter (base, Plus, Plus-Face, Full-face): CLIP features of whole reference images -> image tokens.

Several references give their tokens side by side (the cross-attention reads them all at once).
"""

from __future__ import annotations

from ..errors import IdcraftError
from ..requests import GenerationRequest
from .base import FaceSettings, SDFamily


class IPAdapterFamily(SDFamily):
    name = "ip-adapter"

    def encode(self, pipe, request: GenerationRequest, faces: FaceSettings):
        references = self._references(request)
        if not references:
            raise IdcraftError(f"{pipe.method.name} needs at least one reference image.")
        return pipe.encode_references(references)


FAMILY = IPAdapterFamily()
