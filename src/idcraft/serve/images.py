"""Images over HTTP: base64 in, checked bytes, PIL images; PNG base64 out.

Uploaded bytes are untrusted. Their size is read from the header before anything is decoded, so a
decompression bomb (a tiny file declaring a huge image) is refused with 413 without allocating its
pixels; a file PIL cannot read, or one that is truncated, is refused with 400.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io

from PIL import Image, UnidentifiedImageError

from ..errors import ImageError
from .errors import bad_request, too_large


def content_hash(data: bytes) -> str:
    """The id of a reference: the SHA-256 of its file bytes, in hex."""
    return hashlib.sha256(data).hexdigest()


def from_base64(text: str, what: str = "image") -> bytes:
    """Bytes of a base64 image, with or without a ``data:image/...;base64,`` prefix."""
    if not isinstance(text, str) or not text:
        raise bad_request(f"{what}: expected base64 image data.")
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise bad_request(f"{what}: only base64 data URLs are accepted.")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{what}: not valid base64 ({exc}).") from exc


def check_header(data: bytes, max_pixels: int, what: str = "image") -> tuple[int, int]:
    """Width and height from the file's header (nothing decoded): 400 when PIL cannot read it, 413 when
    it is over ``max_pixels``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:
        raise too_large(f"{what}: image is too large to decode safely ({exc}).") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{what}: not an image PIL can read (PNG, JPEG, WebP, BMP ...).") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{what}: the image is corrupt ({exc}).") from exc
    if width * height > max_pixels:
        raise too_large(
            f"{what}: image is {width}x{height} = {width * height:,} pixels, over this server's limit of "
            f"{max_pixels:,}. Downscale it first."
        )
    return width, height


def decode(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """An upright 8-bit RGB image from file bytes (header checked first; see :func:`check_header`)."""
    from ..images import load_image

    check_header(data, max_pixels, what)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as exc:
        raise too_large(f"{what}: image is too large to decode safely ({exc}).") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{what}: the image is truncated or corrupt ({exc}).") from exc
    return load_image(image, max_pixels=max_pixels)


def to_png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def to_png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
