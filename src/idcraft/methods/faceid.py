"""IP-Adapter-FaceID (FaceID, Plus, PlusV2, Portrait): an ArcFace identity embedding (plus, for Plus and
PlusV2, CLIP features of the aligned face crop) -> identity tokens; LoRA on every attention layer.

Several photos of one person are averaged (Portrait: side by side); with ``multi_person`` each photo, or
each face of one group photo, is a different person placed in its own region (``keypoints`` say where).
"""

from __future__ import annotations

from ..registry import Method
from .base import IdentityFamily


class FaceIDFamily(IdentityFamily):
    name = "faceid"

    def allowed(self, method: Method) -> frozenset[str]:
        return self.options | {"s_scale"} if method.shortcut else self.options


FAMILY = FaceIDFamily()
