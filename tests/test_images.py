"""Untrusted reference images: every failure names the file and the problem."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from idcraft.errors import ImageError
from idcraft.images import load_image


def _png(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_truncated_file(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[:200])
    with pytest.raises(ImageError, match=r"cut\.png.*truncated or corrupt"):
        load_image(path)


def test_not_an_image_and_missing(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ImageError, match="not an image file"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_pixel_limit(tmp_path):
    path = _png(Image.new("RGB", (300, 200)), tmp_path / "big.png")
    with pytest.raises(ImageError, match="300x200 = 60,000 pixels, over the limit"):
        load_image(path, max_pixels=50_000)
    assert load_image(path, max_pixels=60_000).size == (300, 200)


def test_modes_become_rgb(tmp_path):
    gray16 = Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16))
    img = load_image(_png(gray16, tmp_path / "g16.png"))
    assert img.mode == "RGB" and np.asarray(img)[-1, -1, 0] > 240
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(load_image(_png(rgba, tmp_path / "a.png")))[0, 0].tolist() == [255, 255, 255]
    assert load_image(_png(Image.new("L", (8, 8), 7), tmp_path / "l.png")).getpixel((0, 0)) == (7, 7, 7)
    assert load_image(np.zeros((4, 5), np.float32)).size == (5, 4)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)
