"""InstantID (SDXL): the raw ArcFace embedding -> 16 face tokens through a Resampler, and IdentityNet, a
ControlNet on the five facial keypoints whose cross-attention context is the face tokens.

Where the face goes comes from ``keypoints`` (output pixels) or else the reference's own keypoints, and
the output then takes the reference's size after InstantID's resize rule. Extra ControlNets (pose,
depth) take ``control_images`` and see the text, as in the official pipeline.
"""

from __future__ import annotations

from .base import IdentityFamily


class InstantIDFamily(IdentityFamily):
    name = "instantid"


FAMILY = InstantIDFamily()
