"""Rendering: an identity in a scene -> an image with its complete ground truth.

Characters are drawn with Pillow at :data:`SUPERSAMPLE` times the output size and downscaled with
LANCZOS, so 64x64 images have clean anti-aliased edges. Everything the character is made of (body,
pattern, ears, feet, face, accessory) is drawn on one layer at its upright placement, then the layer is
rotated about the face centre for tilted poses; the keypoints and the body outline go through the very
same rotation analytically, so the ground truth is exact, not estimated from pixels.

Coordinates in a :class:`Sample` are output pixels. Keypoints use the OpenCV/insightface convention
(pixel ``(i, j)`` has its centre at ``x=i, y=j``); boxes are ``[x0, y0, x1, y1]`` pixel *edges*
(``x1`` exclusive), so ``image.crop(bbox)`` is the character.

Rendering is a pure function of ``(identity, scene, size, rng state)``: no global random state, and the
backdrops are cached but equally deterministic.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from .backgrounds import HORIZON, backdrop
from .captions import caption as make_caption
from .identity import Identity
from .scene import REFERENCE_SCENE, Scene

SUPERSAMPLE = 4
#: Names of the five keypoints, in insightface order ("left" is the image's left).
KEYPOINT_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

RGB = tuple[int, int, int]

MAIN_RGB: dict[str, RGB] = {
    "red": (215, 45, 45),
    "orange": (240, 135, 35),
    "yellow": (245, 210, 45),
    "green": (70, 175, 65),
    "teal": (35, 165, 155),
    "blue": (55, 105, 220),
    "purple": (140, 75, 200),
    "pink": (240, 125, 180),
}
EYE_RGB: dict[str, RGB] = {
    "black": (20, 20, 25),
    "cobalt": (25, 70, 215),
    "emerald": (15, 155, 70),
    "crimson": (195, 20, 45),
}
ACCESSORY_RGB: dict[str, RGB] = {
    "ebony": (35, 35, 45),
    "ivory": (250, 245, 225),
    "gold": (245, 190, 30),
    "cyan": (40, 205, 235),
}
SCLERA: RGB = (250, 250, 250)
HORN: RGB = (240, 228, 195)

#: Body proportions (width, height) as fractions of the character's extent.
BODY_PROPORTIONS: dict[str, tuple[float, float]] = {
    "round": (1.0, 1.0),
    "square": (0.92, 0.92),
    "triangle": (1.05, 0.95),
    "oval": (0.72, 1.0),
    "hexagon": (1.0, 0.87),
    "pear": (0.86, 1.0),
}
#: Face centre below the body centre, as a fraction of body height (lower where the top is narrow).
FACE_OFFSET: dict[str, float] = {
    "round": 0.06,
    "square": 0.05,
    "triangle": 0.2,
    "oval": 0.05,
    "hexagon": 0.04,
    "pear": 0.13,
}
#: Extent of the character (output pixels at 64x64) per size; reference portraits are larger still.
EXTENT = {"small": 19.0, "large": 28.0}
REFERENCE_EXTENT = 36.0
#: Horizontal centre per position and size (output pixels at 64x64).
CENTRE_X = {
    "small": {"left": 12.5, "centre": 32.0, "right": 51.5},
    "large": {"left": 19.0, "centre": 32.0, "right": 45.0},
}
#: Feet line per size (output pixels at 64x64), below every backdrop's horizon.
GROUND_Y = {"small": 55.0, "large": 58.5}
TILT_DEGREES = 16.0
JUMP_LIFT = 0.32  # of the body height


def _tone(rgb: RGB, tone: str) -> RGB:
    """The main colour shifted within its family: pale is lighter and less saturated, deep darker, both
    with a small hue shift, so tone is a fine detail that does not change the colour's name."""
    h, lightness, s = colorsys.rgb_to_hls(*(v / 255 for v in rgb))
    if tone == "pale":
        h, lightness, s = h + 0.01, lightness + (1 - lightness) * 0.35, s * 0.85
    elif tone == "deep":
        h, lightness, s = h - 0.01, lightness * 0.76, min(1.0, s * 1.05)
    return tuple(round(v * 255) for v in colorsys.hls_to_rgb(h % 1.0, lightness, s))  # type: ignore[return-value]


def _scale(rgb: RGB, factor: float) -> RGB:
    return tuple(max(0, min(255, round(v * factor))) for v in rgb)  # type: ignore[return-value]


def palette(identity: Identity) -> dict[str, RGB]:
    """The colours an identity is drawn with (``body``, ``outline``, ``feet``, ``nose``, ``pattern``,
    ``eye``, ``accessory``); exposed so tests and judges can check rendered pixels against them."""
    body = _tone(MAIN_RGB[identity.colour], identity.tone)
    colours = {
        "body": body,
        "outline": _scale(body, 0.42),
        "feet": _scale(body, 0.62),
        "nose": _scale(body, 0.5),
        "lid": _scale(body, 0.82),
        "eye": EYE_RGB[identity.eye_colour],
        "mouth": (90, 20, 30),
    }
    pattern = {"white": (245, 245, 245), "charcoal": (55, 55, 65), "shade": _scale(body, 0.68)}
    if identity.pattern_colour in pattern:
        colours["pattern"] = pattern[identity.pattern_colour]
    if identity.accessory_colour in ACCESSORY_RGB:
        colours["accessory"] = ACCESSORY_RGB[identity.accessory_colour]
    return colours


# ---------------------------------------------------------------------------- body geometry
def _profile(shape: str) -> Callable[[float], float]:
    """Half-width of the body (as a fraction of its width) at relative height ``s`` (0 top, 1 bottom).
    Every shape is symmetric, so a profile defines it and gives the top edge at any x for free."""

    def rounded(s: float, hw: float, radius: float) -> float:
        """Round off a flat top/bottom: shrink ``hw`` near the ends within ``radius`` (of height)."""
        d = min(s, 1 - s)
        if d >= radius:
            return hw
        return hw - radius + math.sqrt(max(0.0, radius**2 - (radius - d) ** 2))

    if shape in ("round", "oval"):
        return lambda s: 0.5 * math.sqrt(max(0.0, 1 - (2 * s - 1) ** 2))
    if shape == "square":
        return lambda s: rounded(s, 0.5, 0.16)
    if shape == "triangle":
        return lambda s: max(0.0, rounded(s, 0.5 * (0.07 + 0.93 * s), 0.06))
    if shape == "hexagon":
        return lambda s: rounded(s, 0.25 + 0.5 * min(s, 1 - s), 0.04)
    if shape == "pear":
        return lambda s: 0.5 * math.sqrt(max(0.0, 1 - (2 * s - 1) ** 2)) * (0.66 + 0.34 * s**0.8) / 0.95
    raise ValueError(f"unknown shape {shape!r}")


@dataclass
class _Body:
    """The upright body in supersampled pixels: centre, size and outline polygon."""

    cx: float
    cy: float
    w: float
    h: float
    profile: Callable[[float], float]
    polygon: list[tuple[float, float]]

    @property
    def top(self) -> float:
        return self.cy - self.h / 2

    @property
    def bottom(self) -> float:
        return self.cy + self.h / 2

    def half_width(self, y: float) -> float:
        return self.w * self.profile(min(1.0, max(0.0, (y - self.top) / self.h)))

    def top_at(self, x: float) -> float:
        """The body's upper edge at ``x`` (where accessories and ears sit)."""
        dx = abs(x - self.cx)
        for k in range(101):
            s = k / 100
            if self.w * self.profile(s) >= dx:
                return self.top + s * self.h
        return self.cy


def _body(shape: str, cx: float, bottom: float, extent: float) -> _Body:
    fw, fh = BODY_PROPORTIONS[shape]
    w, h = fw * extent, fh * extent
    profile = _profile(shape)
    top = bottom - h
    steps = 48
    right = [(cx + w * profile(k / steps), top + h * k / steps) for k in range(steps + 1)]
    left = [(2 * cx - x, y) for x, y in reversed(right)]
    return _Body(cx, bottom - h / 2, w, h, profile, right + left)


# ---------------------------------------------------------------------------- drawing
def _circle(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, **kwargs) -> None:
    draw.ellipse([x - r, y - r, x + r, y + r], **kwargs)


def _pattern_mask(identity: Identity, body: _Body, canvas: int) -> Image.Image:
    """Where the pattern colour goes, anchored to the body so it moves and rotates with it."""
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    x0, x1 = body.cx - body.w / 2, body.cx + body.w / 2
    h = body.h
    if identity.pattern == "stripes":
        y = body.top + 0.12 * h
        while y < body.bottom:
            draw.rectangle([x0, y, x1, y + 0.1 * h], fill=255)
            y += 0.25 * h
    elif identity.pattern == "spots":
        period, r = 0.27 * h, 0.07 * h
        for row, y in enumerate(np.arange(body.top + 0.1 * h, body.bottom, period)):
            shift = period / 2 if row % 2 else 0.0
            for x in np.arange(x0 + 0.05 * h + shift, x1, period):
                _circle(draw, float(x), float(y), r, fill=255)
    elif identity.pattern == "checks":
        cell = 0.19 * h
        for row, y in enumerate(np.arange(body.top, body.bottom, cell)):
            for col, x in enumerate(np.arange(x0, x1, cell)):
                if (row + col) % 2 == 0:
                    draw.rectangle([float(x), float(y), float(x + cell), float(y + cell)], fill=255)
    return mask


def _draw_ears(
    draw: ImageDraw.ImageDraw, identity: Identity, body: _Body, colours: dict, line: float
) -> None:
    if identity.ears == "none":
        return
    h = body.h
    for side in (-1, 1):
        x = body.cx + side * 0.3 * body.w
        y = body.top_at(x) + 0.04 * h
        if identity.ears == "pointy":
            pts = [
                (x - 0.13 * h, y + 0.04 * h),
                (x + side * 0.1 * h, y - 0.26 * h),
                (x + 0.13 * h, y + 0.04 * h),
            ]
            draw.polygon(pts, fill=colours["body"], outline=colours["outline"], width=round(line))
        elif identity.ears == "rounded":
            _circle(
                draw,
                x + side * 0.03 * h,
                y - 0.07 * h,
                0.13 * h,
                fill=colours["body"],
                outline=colours["outline"],
                width=round(line),
            )
        elif identity.ears == "antennae":
            tip = (x + side * 0.12 * h, y - 0.32 * h)
            draw.line([(x, y + 0.05 * h), tip], fill=colours["outline"], width=round(line * 1.2))
            _circle(
                draw, *tip, 0.065 * h, fill=colours["feet"], outline=colours["outline"], width=round(line)
            )
        elif identity.ears == "horns":
            pts = [
                (x - 0.08 * h, y + 0.04 * h),
                (x + side * 0.17 * h, y - 0.24 * h),
                (x + 0.08 * h, y + 0.04 * h),
            ]
            draw.polygon(pts, fill=HORN, outline=_scale(HORN, 0.55), width=round(line))


def _draw_feet(draw: ImageDraw.ImageDraw, body: _Body, colours: dict, line: float) -> float:
    """Two feet under the body; returns the y of their soles (the character's ground point)."""
    ry, rx = 0.085 * body.h, 0.13 * body.w
    y = body.bottom - 0.01 * body.h
    for side in (-1, 1):
        x = body.cx + side * 0.22 * body.w
        draw.ellipse(
            [x - rx, y - ry, x + rx, y + ry],
            fill=colours["feet"],
            outline=colours["outline"],
            width=round(line),
        )
    return y + ry


def _face_geometry(identity: Identity, body: _Body) -> tuple[float, float, float]:
    """Face centre and face unit (the scale of eyes, nose and mouth), fitted inside the body."""
    fy = body.cy + FACE_OFFSET[identity.shape] * body.h
    unit = min(0.8 * min(body.w, body.h), body.half_width(fy - 0.12 * body.h) / 0.5)
    return body.cx, fy, unit


def _draw_face(
    draw: ImageDraw.ImageDraw, identity: Identity, body: _Body, colours: dict, line: float
) -> np.ndarray:
    """Eyes, nose and mouth; returns the five keypoints (upright, supersampled pixels)."""
    fx, fy, u = _face_geometry(identity, body)
    ey = fy - 0.1 * u
    eyes = [(fx - 0.21 * u, ey), (fx + 0.21 * u, ey)]
    style = identity.eye_style
    sclera_r = {"classic": 0.12, "wide": 0.155, "sleepy": 0.125, "dot": 0.0}[style] * u
    pupil_r = {"classic": 0.07, "wide": 0.08, "sleepy": 0.07, "dot": 0.095}[style] * u
    for x, y in eyes:
        if style == "dot":
            _circle(draw, x, y, pupil_r, fill=colours["eye"], outline=SCLERA, width=max(1, round(0.025 * u)))
        else:
            _circle(
                draw, x, y, sclera_r, fill=SCLERA, outline=colours["outline"], width=max(1, round(0.022 * u))
            )
            _circle(draw, x, y, pupil_r, fill=colours["eye"])
            if style == "sleepy":  # the upper lid covers the eye above 0.35 radius over the centre
                box = [x - sclera_r, y - sclera_r, x + sclera_r, y + sclera_r]
                draw.chord(
                    box,
                    200,
                    340,
                    fill=colours["lid"],
                    outline=colours["outline"],
                    width=max(1, round(0.022 * u)),
                )
        _circle(draw, x + 0.55 * pupil_r, y - 0.55 * pupil_r, 0.24 * pupil_r, fill=SCLERA)
    nose = (fx, fy + 0.06 * u)
    _circle(draw, *nose, 0.045 * u, fill=colours["nose"])
    my = fy + 0.22 * u
    half = {"smile": 0.15, "flat": 0.12, "open": 0.09, "fang": 0.16}[identity.mouth] * u
    width = max(2, round(0.04 * u))
    box = [fx - half, my - 0.09 * u, fx + half, my + 0.09 * u]
    if identity.mouth in ("smile", "fang"):
        draw.arc(box, 0, 180, fill=colours["mouth"], width=width)
        if identity.mouth == "fang":
            tx = fx + 0.06 * u
            draw.polygon(
                [(tx - 0.035 * u, my + 0.075 * u), (tx + 0.035 * u, my + 0.075 * u), (tx, my + 0.16 * u)],
                fill=SCLERA,
            )
    elif identity.mouth == "flat":
        draw.line([(fx - half, my), (fx + half, my)], fill=colours["mouth"], width=width)
    else:  # open
        draw.ellipse([fx - half, my - 0.06 * u, fx + half, my + 0.08 * u], fill=colours["mouth"])
    kps = [eyes[0], eyes[1], nose, (fx - half, my), (fx + half, my)]
    if identity.accessory == "glasses":
        frame = (sclera_r or pupil_r) + 0.06 * u
        for x, y in eyes:
            _circle(draw, x, y, frame, outline=colours["accessory"], width=max(2, round(0.05 * u)))
        draw.line(
            [(eyes[0][0] + frame, ey), (eyes[1][0] - frame, ey)],
            fill=colours["accessory"],
            width=max(2, round(0.05 * u)),
        )
    return np.asarray(kps, dtype=np.float64)


def _draw_headwear(
    draw: ImageDraw.ImageDraw, identity: Identity, body: _Body, colours: dict, line: float
) -> None:
    if identity.accessory in ("none", "glasses"):
        return
    fill, edge, h = colours["accessory"], _scale(colours["accessory"], 0.45), body.h
    if identity.accessory == "hat":
        top = body.top_at(body.cx) + 0.03 * h
        half = 0.3 * min(body.w, h)
        draw.rectangle(
            [body.cx - 0.62 * half, top - 0.34 * h, body.cx + 0.62 * half, top],
            fill=fill,
            outline=edge,
            width=round(line),
        )
        draw.rectangle(
            [body.cx - half, top - 0.05 * h, body.cx + half, top + 0.02 * h],
            fill=fill,
            outline=edge,
            width=round(line),
        )
    elif identity.accessory == "crown":
        top = body.top_at(body.cx) + 0.04 * h
        half = 0.22 * min(body.w, h)
        pts = [
            (body.cx - half, top),
            (body.cx - half, top - 0.22 * h),
            (body.cx - half / 2, top - 0.1 * h),
            (body.cx, top - 0.26 * h),
        ]
        pts += [(2 * body.cx - x, y) for x, y in reversed(pts)]
        draw.polygon(pts, fill=fill, outline=edge, width=round(line))
    elif identity.accessory == "bow":
        x = body.cx + 0.2 * body.w
        y = body.top_at(x) + 0.02 * h
        s = 0.13 * h
        for side in (-1, 1):
            draw.polygon(
                [(x, y), (x + side * 1.5 * s, y - s), (x + side * 1.5 * s, y + s)],
                fill=fill,
                outline=edge,
                width=round(line),
            )
        _circle(draw, x, y, 0.45 * s, fill=fill, outline=edge, width=round(line))


def _rotate_points(points: np.ndarray, pivot: tuple[float, float], degrees: float) -> np.ndarray:
    """Rotate index-coordinate points as ``Image.rotate(degrees, center=pivot)`` rotates pixels
    (counter-clockwise as seen; Pillow's centre is in edge coordinates, pixel centres at +0.5)."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    d = points + 0.5 - np.asarray(pivot)
    out = np.stack([d[:, 0] * c + d[:, 1] * s, -d[:, 0] * s + d[:, 1] * c], axis=1)
    return out + np.asarray(pivot) - 0.5


def _rotate_layer(layer: Image.Image, degrees: float, pivot: tuple[float, float]) -> Image.Image:
    """``layer.rotate(degrees, center=pivot)``, computed on the square around the pivot that holds the
    drawing (a few times fewer pixels than the canvas: rotation is most of a render's time)."""
    box = layer.getchannel("A").getbbox()
    if box is None:
        return layer
    px, py = pivot
    radius = (
        math.ceil(max(math.hypot(x - px, y - py) for x in (box[0], box[2]) for y in (box[1], box[3]))) + 2
    )
    x0, y0 = math.floor(px) - radius, math.floor(py) - radius
    crop = layer.crop((x0, y0, x0 + 2 * radius, y0 + 2 * radius))
    crop = crop.rotate(degrees, resample=Image.BILINEAR, center=(px - x0, py - y0))
    out = Image.new("RGBA", layer.size, (0, 0, 0, 0))
    out.paste(crop, (x0, y0))
    return out


# ---------------------------------------------------------------------------- samples
@dataclass
class Sample:
    """A rendered image and everything true about it.

    ``kps``: ``[5, 2]`` keypoints (:data:`KEYPOINT_NAMES`) in output pixels, pixel centres at integers.
    ``bbox``: the whole character (ears, feet, accessory included); ``face_bbox``: the body, the
    "head" that carries the face (what a face detector should box). Both are pixel-edge boxes.
    """

    image: Image.Image
    caption: str
    kps: np.ndarray
    bbox: tuple[float, float, float, float]
    face_bbox: tuple[float, float, float, float]
    identity: Identity
    scene: Scene
    #: placement actually used (centre x, ground y, extent, angle; output pixels/degrees), after jitter
    placement: dict = field(default_factory=dict)

    def ground_truth(self) -> dict:
        """JSON-ready ground truth: ``identity_id``, ``attributes``, ``scene``, ``kps``, ``bbox``,
        ``face_bbox``, ``placement`` (what dataset manifests store beside image and caption)."""
        return {
            "identity_id": self.identity.id,
            "attributes": self.identity.attributes(),
            "scene": self.scene.to_dict(),
            "kps": [[round(float(x), 3), round(float(y), 3)] for x, y in self.kps],
            "bbox": [round(float(v), 3) for v in self.bbox],
            "face_bbox": [round(float(v), 3) for v in self.face_bbox],
            "placement": {k: round(float(v), 3) for k, v in self.placement.items()},
        }


def render(
    identity: Identity,
    scene: Scene,
    size: int = 64,
    rng: np.random.Generator | None = None,
    *,
    _reference: bool = False,
) -> Sample:
    """Draw ``identity`` in ``scene`` as a ``size x size`` RGB image with its ground truth.

    Without ``rng`` the placement is canonical and the caption the canonical template; with it, the
    character is jittered slightly (position +-1.5 px, scale +-6 %, angle +-3 deg at 64 px) and the
    caption paraphrased, both drawn from ``rng`` -- still deterministic for a given generator state.
    """
    ss = SUPERSAMPLE * size / 64.0  # supersampled pixels per 64-px output pixel
    canvas = SUPERSAMPLE * size
    if _reference:
        extent, cx, angle, lift = REFERENCE_EXTENT, 32.0, 0.0, 0.0
        ground = 32.0 + REFERENCE_EXTENT * 0.5 + 0.12 * REFERENCE_EXTENT
    else:
        extent = EXTENT[scene.size]
        cx, ground = CENTRE_X[scene.size][scene.position], GROUND_Y[scene.size]
        angle = {"tilt_left": TILT_DEGREES, "tilt_right": -TILT_DEGREES}.get(scene.pose, 0.0)
        lift = JUMP_LIFT if scene.pose == "jumping" else 0.0
    if rng is not None:
        cx += float(rng.uniform(-1.5, 1.5))
        ground += float(rng.uniform(-1.0, 1.0))
        extent *= float(rng.uniform(0.94, 1.06))
        angle += float(rng.uniform(-3.0, 3.0))
    colours = palette(identity)
    line = max(2.0, 0.045 * extent * ss)
    # body bottom sits so that the feet soles touch the ground line (lifted when jumping)
    fh = BODY_PROPORTIONS[identity.shape][1] * extent
    bottom = (ground - lift * fh - 0.075 * fh) * ss
    body = _body(identity.shape, cx * ss, bottom, extent * ss)

    layer = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    _draw_ears(draw, identity, body, colours, line)
    feet_y = _draw_feet(draw, body, colours, line)
    draw.polygon(body.polygon, fill=colours["body"])
    if identity.pattern != "plain":
        body_mask = Image.new("L", (canvas, canvas), 0)
        ImageDraw.Draw(body_mask).polygon(body.polygon, fill=255)
        mask = ImageChops.multiply(_pattern_mask(identity, body, canvas), body_mask)
        layer.paste(colours["pattern"] + (255,), mask=mask)
    draw.line(body.polygon + [body.polygon[0]], fill=colours["outline"], width=round(line), joint="curve")
    kps = _draw_face(draw, identity, body, colours, line)
    _draw_headwear(draw, identity, body, colours, line)

    outline = np.asarray(body.polygon, dtype=np.float64)
    # rotate about the face centre: the face stays where the scene's position puts it, whatever the pose
    _, face_y, _ = _face_geometry(identity, body)
    pivot = (body.cx + 0.5, face_y + 0.5)
    if angle:
        layer = _rotate_layer(layer, angle, pivot)
        kps = _rotate_points(kps, pivot, angle)
        outline = _rotate_points(outline, pivot, angle)

    image = backdrop(scene.background, scene.variant, canvas).copy()
    if not _reference:  # a soft shadow on the ground, left behind when jumping
        shadow = ImageDraw.Draw(image, "RGBA")
        sx, sy, rx = cx * ss, ground * ss, 0.42 * body.w
        shadow.ellipse([sx - rx, sy - 0.05 * body.h, sx + rx, sy + 0.05 * body.h], fill=(0, 0, 0, 55))
    image.paste(layer, mask=layer.getchannel("A"))
    image = image.resize((size, size), Image.LANCZOS)

    scale = SUPERSAMPLE
    alpha_box = layer.getchannel("A").point(lambda a: 255 if a >= 128 else 0).getbbox() or (0, 0, 0, 0)
    bbox = tuple(v / scale for v in alpha_box)
    lo = np.clip(outline.min(axis=0) + 0.5, 0, canvas) / scale
    hi = np.clip(outline.max(axis=0) + 0.5, 0, canvas) / scale
    return Sample(
        image=image,
        caption=make_caption(identity, scene, rng),
        kps=((kps - (scale - 1) / 2) / scale).astype(np.float32),
        bbox=bbox,  # type: ignore[arg-type]
        face_bbox=(float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])),
        identity=identity,
        scene=scene,
        placement={
            "x": cx * size / 64,
            "ground": feet_y / scale,
            "extent": extent * size / 64,
            "angle": angle,
        },
    )


def render_reference(identity: Identity, size: int = 64) -> Sample:
    """The canonical portrait of ``identity``: centred, upright, larger than in scenes, on the neutral
    studio backdrop -- the reference image an adapter is given."""
    return render(identity, REFERENCE_SCENE, size, _reference=True)


def grid(images: Sequence[Image.Image], columns: int = 8, zoom: int = 1, gap: int = 2) -> Image.Image:
    """Images tiled in rows of ``columns`` (each enlarged ``zoom`` times, nearest): contact sheets for
    looking at the world."""
    w, h = images[0].size
    w, h = w * zoom, h * zoom
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * (w + gap) - gap, rows * (h + gap) - gap), (255, 255, 255))
    for k, im in enumerate(images):
        tile = im.convert("RGB").resize((w, h), Image.NEAREST) if zoom != 1 else im.convert("RGB")
        sheet.paste(tile, ((k % columns) * (w + gap), (k // columns) * (h + gap)))
    return sheet


__all__ = ["HORIZON", "KEYPOINT_NAMES", "Sample", "grid", "palette", "render", "render_reference"]
