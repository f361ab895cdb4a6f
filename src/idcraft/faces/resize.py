"""InstantID's reference-image resize rule (``resize_img`` in its app and inference scripts).

InstantID analyses the face and draws the keypoint image on the *resized* reference, and generates at that
size, so idcraft applies the same rule. Its behaviour is kept even where it surprises: the image is first
scaled so its short side is ``min_side``, then scaled again so its long side is ``max_side`` (so a square
photo ends at 1280x1280, not 1024), both times with the given resampling filter, and finally resized to the
long/short sides floored to multiples of ``base_pixel_number``. Padding centres it on a white square.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import ImageError


def resize_img(
    input_image: Image.Image,
    max_side: int = 1280,
    min_side: int = 1024,
    size: tuple[int, int] | None = None,
    pad_to_max_side: bool = False,
    mode: Image.Resampling | int = Image.BILINEAR,
    base_pixel_number: int = 64,
) -> Image.Image:
    """Resize a reference photo the way InstantID does (see the module docstring); ``size=(w, h)`` forces
    the final size."""
    name = getattr(input_image, "filename", "")  # kept, so that a face error names the file
    w, h = input_image.size
    if size is not None:
        new_w, new_h = (int(v) for v in size)
    else:
        ratio = min_side / min(h, w)
        w, h = round(ratio * w), round(ratio * h)
        ratio = max_side / max(h, w)
        input_image = input_image.resize([round(ratio * w), round(ratio * h)], mode)
        new_w = (round(ratio * w) // base_pixel_number) * base_pixel_number
        new_h = (round(ratio * h) // base_pixel_number) * base_pixel_number
    if new_w <= 0 or new_h <= 0:
        raise ImageError(
            f"reference image {input_image.size[0]}x{input_image.size[1]} is too elongated to resize to "
            f"multiples of {base_pixel_number} px within {max_side} px; crop it closer to the face."
        )
    input_image = input_image.resize([new_w, new_h], mode)

    if pad_to_max_side:
        if new_w > max_side or new_h > max_side:
            raise ValueError(f"cannot pad a {new_w}x{new_h} image onto a {max_side} px square.")
        canvas = np.full((max_side, max_side, 3), 255, dtype=np.uint8)
        offset_x = (max_side - new_w) // 2
        offset_y = (max_side - new_h) // 2
        canvas[offset_y : offset_y + new_h, offset_x : offset_x + new_w] = np.asarray(
            input_image.convert("RGB")
        )
        input_image = Image.fromarray(canvas)
    if name:
        input_image.filename = name
    return input_image
