"""Reading user images safely.

Reference photos come from users, so they are untrusted: they may be truncated, huge (decompression
bombs), 16-bit, palette or RGBA, or rotated by an EXIF tag that viewers honour and PIL ignores. Every
image idcraft reads goes through :func:`load_image`, which returns an upright 8-bit RGB image or raises an
:class:`~idcraft.errors.ImageError` that names the file and the problem.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

#: Largest image accepted, in pixels (width x height). 8K x 8K is far more than any adapter uses; the
#: limit exists so that a decompression bomb fails fast instead of exhausting memory.
MAX_PIXELS = int(os.environ.get("IDCRAFT_MAX_PIXELS", 8192 * 8192))

ImageInput = str | os.PathLike | Image.Image | np.ndarray


def load_image(source: ImageInput, *, max_pixels: int | None = None) -> Image.Image:
    """Return ``source`` as an upright 8-bit RGB PIL image.

    ``source`` may be a path, a PIL image or an ``HxWx3`` / ``HxW`` uint8 array (RGB order). Alpha is
    composited onto white (transparent areas of cut-out references then read as background, not black);
    16-bit and float images are scaled to 8 bits; EXIF orientation is applied.
    """
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, (bytes, bytearray)):  # an image file's contents (an upload, say)
        return _from_bytes(bytes(source), limit)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, limit)
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "image"
        _check_size(source.size, limit, name)
        return _named(_to_rgb(ImageOps.exif_transpose(source), name), name)

    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(
            f"expected an image path, PIL image, image array or image bytes, got {type(source).__name__}."
        )
    name = str(source)
    if "://" in name and name.split("://", 1)[0].lower() in ("http", "https", "ftp", "s3", "gs", "hf"):
        raise ImageError(f"{name}: URLs are not fetched: download the image first and pass its path.")
    path = Path(source)
    if not path.exists():
        raise ImageError(f"{name}: no such file.")
    if path.is_dir():
        raise ImageError(f"{name}: is a directory, expected an image file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            _check_size(image.size, limit, name)
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: image is too large to open safely ({exc}).") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not an image file PIL can read (PNG, JPEG, WebP, BMP, TIFF ...).") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(
            f"{name}: the image file is truncated or corrupt ({exc}). Re-export or re-download it."
        ) from exc
    return _named(_to_rgb(ImageOps.exif_transpose(image), name), name)


def _named(image: Image.Image, name: str) -> Image.Image:
    """Keep the file's name on the converted image (``filename``, as PIL's own opened images have it), so
    that a later error about it -- no face found, say -- names the file rather than "image"."""
    if name != "image" and not getattr(image, "filename", ""):
        image.filename = name
    return image


def _from_bytes(data: bytes, limit: int) -> Image.Image:
    import io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.size, limit, "image bytes")
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image bytes: too large to open safely ({exc}).") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(
            f"image bytes ({len(data):,}): not an image file PIL can read (PNG, JPEG, WebP ...), or truncated."
        ) from exc
    return _to_rgb(ImageOps.exif_transpose(image), "image bytes")


def _check_size(size: tuple[int, int], limit: int, name: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has no pixels ({width}x{height}).")
    if width * height > limit:
        raise ImageError(
            f"{name}: image is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,}. "
            "Downscale it first, or raise the limit with IDCRAFT_MAX_PIXELS if you trust the file."
        )


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        if mode == "F":
            top = 1.0 if array.max() <= 1.0 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{name}: cannot convert image mode {mode!r} to RGB ({exc}).") from exc


def _array_to_rgb(array: np.ndarray, limit: int) -> Image.Image:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ImageError(f"array image must be HxW, HxWx3 or HxWx4, got shape {tuple(array.shape)}.")
    _check_size((array.shape[1], array.shape[0]), limit, "array image")
    if array.dtype != np.uint8:
        data = np.asarray(array, dtype=np.float64)
        if not np.all(np.isfinite(data)):
            raise ImageError("array image contains NaN or infinity.")
        if np.issubdtype(array.dtype, np.floating) and data.max() <= 1.0:
            data = data * 255.0
        elif np.issubdtype(array.dtype, np.integer) and data.max() > 255:
            data = data * (255.0 / 65535.0)  # 16-bit data (e.g. cv2.IMREAD_UNCHANGED), not clipped to white
        array = np.clip(data + 0.5, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(array))
    return _to_rgb(image, "array image")
