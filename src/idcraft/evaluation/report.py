"""The evaluation's tables (CSV, Markdown) and its scatter plot (drawn with Pillow: no plotting library)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["COLUMNS", "fewstep_table", "format_table", "identity_metric", "scatter", "write_csv"]

#: CSV columns, in order (cell settings, then means; ``None`` is written empty).
COLUMNS = (
    "model",
    "method",
    "recipe",
    "scale",
    "steps",
    "guidance",
    "images",
    "face_rate",
    "sim_ref",
    "sim_gt",
    "copy",
    "copy_gap",
    "copy_rate",
    "clip_t",
    "clip_i",
    "dino",
    "seconds_per_image",
    "errors",
)

#: Markdown columns: (header, row key).
_TABLE = (
    ("model", "model"),
    ("recipe", "recipe"),
    ("scale", "scale"),
    ("steps", "steps"),
    ("guidance", "guidance"),
    ("n", "images"),
    ("face", "face_rate"),
    ("SimRef", "sim_ref"),
    ("SimGT", "sim_gt"),
    ("copy", "copy"),
    ("copied", "copy_rate"),
    ("CLIP-T", "clip_t"),
    ("CLIP-I", "clip_i"),
    ("DINO", "dino"),
    ("s/img", "seconds_per_image"),
    ("errors", "errors"),
)


def _cell(value, key: str = "") -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if key in ("scale", "guidance"):
            return f"{value:g}"
        if key == "seconds_per_image":
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> str:
    """The rows as CSV text (also written to ``path`` atomically)."""
    from ..outputs import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in COLUMNS])
    atomic_write_text(path, buffer.getvalue())
    return buffer.getvalue()


def format_table(rows: Sequence[dict]) -> str:
    """One Markdown row per cell (method x recipe x scale x steps, then baselines)."""
    used = [
        (h, k)
        for h, k in _TABLE
        if k in ("model", "scale", "images") or any(r.get(k) is not None for r in rows)
    ]
    lines = ["| " + " | ".join(h for h, _ in used) + " |", "|" + "---|" * len(used)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k), k) for _, k in used) + " |")
    return "\n".join(lines)


def identity_metric(rows: Sequence[dict]) -> str | None:
    """The identity score the plot and the few-step table use: the one measured on most method cells
    (ArcFace ``sim_ref`` before ``dino`` before ``clip_i`` on a tie); baselines decide only when no method
    cell has any."""
    keys = ("sim_ref", "dino", "clip_i")
    for pool in ([r for r in rows if r.get("kind", "method") == "method"], list(rows)):
        counts = {k: sum(r.get(k) is not None for r in pool) for k in keys}
        best = max(keys, key=lambda k: counts[k])  # max keeps the first of equal counts
        if counts[best]:
            return best
    return None


METRIC_NAMES = {
    "sim_ref": "identity (ArcFace cosine to the reference)",
    "dino": "identity (DINO cosine to the reference)",
    "clip_i": "identity (CLIP image cosine to the reference)",
    "clip_t": "prompt (CLIP text-image cosine)",
}


def fewstep_table(rows: Sequence[dict]) -> str | None:
    """Does identity survive few-step sampling? One row per model @ scale, one column per recipe (the
    identity score at the recipe's first step count; the change from no recipe in brackets)."""
    methods = [r for r in rows if r.get("kind") == "method"]
    recipes = list(dict.fromkeys(r.get("recipe") or "none" for r in methods))
    metric = identity_metric(methods)
    if metric is None or len(recipes) < 2:
        return None
    table: dict[tuple, dict[str, dict]] = {}
    for r in methods:
        key = (r["model"], r.get("scale"))
        table.setdefault(key, {}).setdefault(r.get("recipe") or "none", r)
    lines = [
        f"Identity ({metric}) by few-step recipe; in brackets the change from the model without a recipe:",
        "",
        "| model | scale | " + " | ".join(recipes) + " |",
        "|" + "---|" * (2 + len(recipes)),
    ]
    for (model, scale), by_recipe in table.items():
        plain = by_recipe.get("none", {}).get(metric)
        cells = []
        for recipe in recipes:
            row = by_recipe.get(recipe)
            value = None if row is None else row.get(metric)
            if value is None:
                cells.append("-")
            elif recipe == "none" or plain is None:
                cells.append(f"{value:.3f} ({row.get('steps') or 'default'} steps)")
            else:
                cells.append(f"{value:.3f} ({value - plain:+.3f}, {row.get('steps')} steps)")
        lines.append(f"| {model} | {_cell(scale, 'scale')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- scatter plot
COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
MARKERS = ("circle", "square", "triangle", "diamond", "cross")


def font(size: int = 12):
    """Pillow's bundled scalable font at ``size`` px (the fixed bitmap font on old Pillow)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _marker(draw, shape: str, x: float, y: float, r: float, colour) -> None:
    if shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - r - 1), (x - r - 1, y + r), (x + r + 1, y + r)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=colour)
    elif shape == "cross":
        draw.line([x - r, y - r, x + r, y + r], fill=colour, width=3)
        draw.line([x - r, y + r, x + r, y - r], fill=colour, width=3)
    else:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def _range(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = max((high - low) * 0.08, 0.02)
    return low - pad, high + pad


def scatter(
    rows: Sequence[dict], path: str | os.PathLike, *, x_key: str = "clip_t", y_key: str | None = None
):
    """Identity (y) against prompt score (x): a point per cell, colour per model, marker per few-step
    recipe, a line through each model's scales (same recipe and steps), numbers = scale; baselines are
    black. Returns the path, or ``None`` when the rows lack either score."""
    from PIL import Image, ImageDraw

    y_key = y_key or identity_metric(rows)
    points = [r for r in rows if r.get(x_key) is not None and y_key and r.get(y_key) is not None]
    if not points:
        return None
    width, height, left, right, top, bottom = 900, 640, 80, 230, 50, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    small, title = font(12), font(14)
    x0, x1 = _range([r[x_key] for r in points])
    y0, y1 = _range([r[y_key] for r in points])

    def at(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        return px, py

    for k in range(6):
        xv, yv = x0 + (x1 - x0) * k / 5, y0 + (y1 - y0) * k / 5
        draw.line([at(xv, y0), at(xv, y1)], fill=(228, 228, 228))
        draw.line([at(x0, yv), at(x1, yv)], fill=(228, 228, 228))
        px, py = at(xv, y0)
        draw.text((px - 14, py + 6), f"{xv:.3f}", fill="black", font=small)
        px, py = at(x0, yv)
        draw.text((px - 52, py - 7), f"{yv:.3f}", fill="black", font=small)
    draw.rectangle([at(x0, y1), at(x1, y0)], outline="black")
    draw.text((left, height - 28), METRIC_NAMES.get(x_key, x_key) + "  ->", fill="black", font=small)
    draw.text(
        (10, 14),
        f"{METRIC_NAMES.get(y_key, y_key)} vs {METRIC_NAMES.get(x_key, x_key)}",
        fill="black",
        font=title,
    )

    models = list(dict.fromkeys(r["model"] for r in points if r.get("kind") == "method"))
    recipes = list(dict.fromkeys((r.get("recipe") or "none") for r in points if r.get("kind") == "method"))
    colour_of = {m: COLOURS[k % len(COLOURS)] for k, m in enumerate(models)}
    marker_of = {m: MARKERS[k % len(MARKERS)] for k, m in enumerate(recipes)}
    series: dict[tuple, list[dict]] = {}
    for r in points:
        if r.get("kind") == "method":
            series.setdefault((r["model"], r.get("recipe") or "none", r.get("steps")), []).append(r)
    for (model, recipe, _), members in series.items():
        members = sorted(members, key=lambda r: r.get("scale") or 0.0)
        xy = [at(r[x_key], r[y_key]) for r in members]
        if len(xy) > 1:
            draw.line(xy, fill=colour_of[model], width=2)
        for r, (px, py) in zip(members, xy, strict=True):
            _marker(draw, marker_of[recipe], px, py, 5, colour_of[model])
            if r.get("scale") is not None:
                draw.text((px + 7, py - 15), f"{r['scale']:g}", fill=colour_of[model], font=small)
    for r in points:
        if r.get("kind") != "method":
            px, py = at(r[x_key], r[y_key])
            _marker(draw, "cross", px, py, 5, (0, 0, 0))
            draw.text((px + 7, py + 2), r["model"], fill="black", font=small)
    lx, ly = width - right + 16, top
    draw.text((lx, ly), "model (colour)", fill="black", font=small)
    for k, model in enumerate(models):
        y = ly + 18 * (k + 1)
        draw.rectangle([lx, y + 3, lx + 10, y + 13], fill=colour_of[model])
        draw.text((lx + 16, y), model, fill="black", font=small)
    ly += 18 * (len(models) + 2)
    draw.text((lx, ly), "recipe (marker)", fill="black", font=small)
    for k, recipe in enumerate(recipes):
        y = ly + 18 * (k + 1)
        _marker(draw, marker_of[recipe], lx + 5, y + 8, 5, (60, 60, 60))
        draw.text((lx + 16, y), recipe, fill="black", font=small)
    if any(r.get("kind") != "method" for r in points):
        y = ly + 18 * (len(recipes) + 2)
        _marker(draw, "cross", lx + 5, y + 8, 5, (0, 0, 0))
        draw.text((lx + 16, y), "baseline", fill="black", font=small)
    from ..outputs import atomic_save_image

    return atomic_save_image(image, Path(path), overwrite=True)
