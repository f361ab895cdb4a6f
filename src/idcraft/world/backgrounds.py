"""Procedural backdrops, one per scene background, each recognisable from its colours and layout alone.

Backdrops are drawn once per ``(name, variant, canvas size)`` and cached: they do not depend on the
character, and rendering thousands of samples must not redraw skies. Details (clouds, stars, buildings)
come from a stable hash of the name and variant, so a backdrop is the same on every machine.
"""

from __future__ import annotations

import random
from functools import lru_cache

from PIL import Image, ImageDraw

from .identity import stable_hash

RGB = tuple[int, int, int]

#: Where the ground starts, as a fraction of the image height (characters stand below it).
HORIZON = {
    "beach": 0.62,
    "forest": 0.64,
    "snow": 0.6,
    "city": 0.66,
    "night": 0.68,
    "desert": 0.6,
    "room": 0.62,
    "studio": 1.0,
}


def _gradient(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], top: RGB, bottom: RGB) -> None:
    x0, y0, x1, y1 = box
    span = max(1, y1 - y0 - 1)
    for y in range(y0, y1):
        t = (y - y0) / span
        colour = tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        draw.line([(x0, y), (x1 - 1, y)], fill=colour)


@lru_cache(maxsize=64)
def backdrop(name: str, variant: int, canvas: int) -> Image.Image:
    """The ``canvas x canvas`` RGB backdrop ``name`` (a scene background or ``"studio"``). Cached: copy it
    before drawing on it."""
    image = Image.new("RGB", (canvas, canvas))
    draw = ImageDraw.Draw(image)
    rnd = random.Random(stable_hash("idcraft-world-backdrop", name, variant))
    c = canvas
    h = round(HORIZON[name] * c)

    def u(v: float) -> int:  # fraction of the canvas -> pixels
        return round(v * c)

    if name == "studio":
        _gradient(draw, (0, 0, c, c), (206, 206, 210), (168, 168, 174))
    elif name == "beach":
        _gradient(draw, (0, 0, c, u(0.48)), (120, 190, 245), (190, 225, 250))
        _gradient(draw, (0, u(0.48), c, h), (40, 120, 200), (70, 160, 215))
        _gradient(draw, (0, h, c, c), (240, 220, 160), (225, 195, 130))
        sx = u(rnd.uniform(0.1, 0.9))
        draw.ellipse([sx - u(0.07), u(0.08), sx + u(0.07), u(0.22)], fill=(255, 235, 120))
        for _ in range(3):  # foam lines
            y = rnd.randint(u(0.5), h - u(0.02))
            x = rnd.randint(0, u(0.7))
            draw.line([(x, y), (x + u(0.25), y)], fill=(200, 230, 250), width=max(1, u(0.01)))
    elif name == "forest":
        _gradient(draw, (0, 0, c, h), (170, 215, 200), (200, 230, 205))
        _gradient(draw, (0, h, c, c), (70, 140, 55), (50, 110, 40))
        x = -u(rnd.uniform(0.0, 0.1))
        while x < c:
            w = u(rnd.uniform(0.14, 0.22))
            top = u(rnd.uniform(0.12, 0.3))
            draw.rectangle([x + w // 2 - u(0.015), h - u(0.06), x + w // 2 + u(0.015), h], fill=(90, 60, 30))
            draw.polygon([(x, h - u(0.04)), (x + w // 2, top), (x + w, h - u(0.04))], fill=(30, 95, 45))
            x += w - u(0.03)
    elif name == "snow":
        _gradient(draw, (0, 0, c, h), (175, 200, 225), (215, 225, 240))
        x = -u(0.1)
        while x < c:
            w = u(rnd.uniform(0.3, 0.5))
            peak = u(rnd.uniform(0.18, 0.35))
            draw.polygon([(x, h), (x + w // 2, peak), (x + w, h)], fill=(140, 150, 175))
            draw.polygon(
                [
                    (x + w // 2 - w // 8, peak + (h - peak) // 4),
                    (x + w // 2, peak),
                    (x + w // 2 + w // 8, peak + (h - peak) // 4),
                ],
                fill=(245, 248, 255),
            )
            x += w - u(0.08)
        _gradient(draw, (0, h, c, c), (245, 248, 255), (225, 232, 245))
        for _ in range(40):
            fx, fy = rnd.randint(0, c - 1), rnd.randint(0, c - 1)
            r = max(1, u(0.008))
            draw.ellipse([fx - r, fy - r, fx + r, fy + r], fill=(255, 255, 255))
    elif name == "city":
        _gradient(draw, (0, 0, c, h), (240, 170, 120), (250, 210, 160))
        x = 0
        while x < c:
            w = u(rnd.uniform(0.12, 0.2))
            top = u(rnd.uniform(0.15, 0.45))
            shade = rnd.randint(85, 125)
            draw.rectangle([x, top, x + w - u(0.01), h], fill=(shade, shade, shade + 12))
            for wy in range(top + u(0.03), h - u(0.04), u(0.07)):
                for wx in range(x + u(0.025), x + w - u(0.04), u(0.05)):
                    if rnd.random() < 0.6:
                        draw.rectangle([wx, wy, wx + u(0.02), wy + u(0.03)], fill=(250, 225, 120))
            x += w
        _gradient(draw, (0, h, c, c), (120, 120, 125), (95, 95, 100))
        draw.line([(0, h + u(0.1)), (c, h + u(0.1))], fill=(230, 230, 230), width=max(1, u(0.012)))
    elif name == "night":
        _gradient(draw, (0, 0, c, h), (10, 15, 50), (35, 45, 100))
        for _ in range(45):
            sx, sy = rnd.randint(0, c - 1), rnd.randint(0, h - u(0.05))
            r = max(1, u(rnd.choice((0.005, 0.008, 0.012))))
            draw.ellipse([sx - r, sy - r, sx + r, sy + r], fill=(255, 255, 225))
        mx, my = u(rnd.uniform(0.15, 0.85)), u(0.15)
        draw.ellipse([mx - u(0.07), my - u(0.07), mx + u(0.07), my + u(0.07)], fill=(245, 240, 200))
        draw.ellipse([mx - u(0.03), my - u(0.09), mx + u(0.1), my + u(0.05)], fill=(20, 28, 70))
        _gradient(draw, (0, h, c, c), (30, 40, 55), (20, 25, 35))
    elif name == "desert":
        _gradient(draw, (0, 0, c, h), (250, 200, 120), (250, 230, 170))
        sx = u(rnd.uniform(0.1, 0.9))
        draw.ellipse([sx - u(0.09), u(0.06), sx + u(0.09), u(0.24)], fill=(255, 250, 220))
        for i in range(2):
            cx, w = u(rnd.uniform(0.1, 0.9)), u(rnd.uniform(0.5, 0.8))
            tone = (225 - 15 * i, 165 - 10 * i, 90)
            draw.ellipse([cx - w, h - u(0.08) + i * u(0.03), cx + w, h + u(0.3)], fill=tone)
        _gradient(draw, (0, h, c, c), (230, 180, 105), (210, 155, 85))
        kx = u(rnd.choice((0.08, 0.9)))
        draw.rectangle([kx - u(0.02), h - u(0.2), kx + u(0.02), h + u(0.04)], fill=(60, 140, 60))
        draw.rectangle([kx - u(0.07), h - u(0.12), kx - u(0.02), h - u(0.1)], fill=(60, 140, 60))
        draw.rectangle([kx - u(0.07), h - u(0.17), kx - u(0.05), h - u(0.1)], fill=(60, 140, 60))
    elif name == "room":
        wall = rnd.choice(((230, 215, 190), (205, 220, 225), (225, 205, 215), (215, 225, 200)))
        draw.rectangle([0, 0, c, h], fill=wall)
        wx = u(rnd.uniform(0.1, 0.6))
        draw.rectangle([wx, u(0.1), wx + u(0.3), u(0.42)], fill=(250, 250, 250))
        draw.rectangle([wx + u(0.02), u(0.12), wx + u(0.28), u(0.4)], fill=(150, 200, 240))
        draw.line([(wx + u(0.15), u(0.12)), (wx + u(0.15), u(0.4))], fill=(250, 250, 250), width=u(0.015))
        _gradient(draw, (0, h, c, c), (165, 115, 70), (140, 95, 55))
        draw.rectangle([0, h - u(0.02), c, h], fill=(120, 85, 50))
        for y in range(h + u(0.1), c, u(0.1)):
            draw.line([(0, y), (c, y)], fill=(130, 90, 52), width=max(1, u(0.006)))
    else:
        raise ValueError(f"no backdrop named {name!r}")
    return image
