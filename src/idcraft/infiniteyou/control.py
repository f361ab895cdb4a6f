"""InfiniteYou's control image: the five face keypoints drawn on black at the output size, or all black.

The official wrapper fits a pose reference into the output frame (:func:`resize_and_pad`: shorter target
side, LANCZOS, centred on white), finds the largest face there and draws its keypoints with InstantID's
``draw_kps`` (:func:`idcraft.faces.draw.draw_kps`, pixel-exact) on a black canvas of the output size;
without a pose reference the control image is all black. Either way InfuseNet reads it VAE-encoded.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import IdcraftError


def resize_and_pad(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` scaled to the target's shorter side (LANCZOS, sizes truncated) and centred on a white
    ``width`` x ``height`` canvas, as the official ``resize_and_pad_image``."""
    source_w, source_h = image.size
    if width <= height:
        new_w, new_h = width, int(width * (source_h / source_w))
    else:
        new_w, new_h = int(height * (source_w / source_h)), height
    resized = image.convert("RGB").resize((new_w, new_h), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(resized, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def control_image(width: int, height: int, keypoints=None) -> Image.Image:
    """The control image for keypoints (five ``[x, y]`` in output pixels) or, for ``None``, all black."""
    if keypoints is None:
        return Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
    from ..faces.draw import draw_kps

    kps = np.asarray(keypoints)
    if kps.ndim == 3:  # one face's points given as a list of faces
        if len(kps) != 1:
            raise IdcraftError(f"infiniteyou draws one face's keypoints; {len(kps)} faces were given.")
        kps = kps[0]
    if kps.shape != (5, 2):
        raise IdcraftError(f"keypoints must be five [x, y] pairs in output pixels, got shape {kps.shape}.")
    return draw_kps(Image.new("RGB", (width, height)), kps)
