"""Labelled image grids: the evaluation's sample sheet and ``idcraft compare``'s side-by-side view."""

from __future__ import annotations

from collections.abc import Sequence

from .report import font

__all__ = ["compare_grid", "sample_grid"]

BACKGROUND = (255, 255, 255)
MISSING = (235, 235, 235)


def _tile(image, size: int):
    """``image`` (path, PIL or array) fitted into a ``size`` square (aspect kept, white margins); a grey
    square when there is none."""
    from PIL import Image

    tile = Image.new("RGB", (size, size), MISSING if image is None else BACKGROUND)
    if image is None:
        return tile
    from ..images import load_image

    try:
        picture = load_image(image)
    except Exception:  # noqa: BLE001 - an unreadable image shows as a grey square
        return Image.new("RGB", (size, size), MISSING)
    picture = picture.copy()
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    if picture.size != (size, size) and max(picture.size) < size:  # small outputs are scaled up
        factor = size / max(picture.size)
        picture = picture.resize(
            (max(1, round(picture.width * factor)), max(1, round(picture.height * factor))),
            Image.Resampling.NEAREST,
        )
    tile.paste(picture, ((size - picture.width) // 2, (size - picture.height) // 2))
    return tile


def _wrap(draw, text: str, width: int, face) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=face) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    return lines


def sample_grid(
    rows: Sequence[tuple[str, Sequence]],
    *,
    header: Sequence[tuple[str, Sequence]] = (),
    column_titles: Sequence[str] = (),
    tile: int = 128,
    label_width: int = 230,
):
    """A sheet: ``header`` rows (the references, the ground-truth photos) then one row per cell, each a
    label and its images in the same columns (same subject, prompt and seed down a column)."""
    from PIL import Image, ImageDraw

    every = list(header) + list(rows)
    columns = max([len(images) for _, images in every] + [1])
    gap, title_h = 4, (34 if column_titles else 0)
    sheet = Image.new(
        "RGB", (label_width + columns * (tile + gap), title_h + len(every) * (tile + gap)), BACKGROUND
    )
    draw = ImageDraw.Draw(sheet)
    small = font(11)
    for c, title in enumerate(column_titles[:columns]):
        lines = _wrap(draw, title, tile, small)[:2]
        for k, line in enumerate(lines):
            draw.text((label_width + c * (tile + gap), 2 + 14 * k), line, fill="black", font=small)
    for r, (label, images) in enumerate(every):
        y = title_h + r * (tile + gap)
        for k, line in enumerate(label.splitlines()[: tile // 14]):
            for j, part in enumerate(_wrap(draw, line, label_width - 8, small)[:1]):
                draw.text((4, y + 4 + 14 * (k + j)), part, fill="black", font=small)
        for c, image in enumerate(images):
            sheet.paste(_tile(image, tile), (label_width + c * (tile + gap), y))
        if r == len(header) - 1 and rows:
            draw.line([0, y + tile + gap // 2, sheet.width, y + tile + gap // 2], fill=(120, 120, 120))
    return sheet


def compare_grid(
    columns: Sequence[tuple[str, object, Sequence[str]]],
    *,
    title: str = "",
    tile: int = 256,
):
    """One row of labelled images side by side (the reference first), each with its title above and its
    score lines below."""
    from PIL import Image, ImageDraw

    gap, small, big = 8, font(12), font(14)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heads = [_wrap(scratch, label, tile, big)[:3] for label, _, _ in columns]
    head_h = 18 * max([len(h) for h in heads] + [1]) + 6
    foot_h = 16 * max([len(lines) for _, _, lines in columns] + [1]) + 8
    title_h = 28 if title else 0
    width = gap + len(columns) * (tile + gap)
    sheet = Image.new("RGB", (max(width, 200), title_h + head_h + tile + foot_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        for k, line in enumerate(_wrap(draw, title, sheet.width - 2 * gap, big)[:1]):
            draw.text((gap, 6 + 18 * k), line, fill="black", font=big)
    for c, ((_, image, lines), head) in enumerate(zip(columns, heads, strict=True)):
        x = gap + c * (tile + gap)
        for k, line in enumerate(head):
            draw.text((x, title_h + 2 + 18 * k), line, fill="black", font=big)
        sheet.paste(_tile(image, tile), (x, title_h + head_h))
        for k, line in enumerate(lines):
            draw.text((x, title_h + head_h + tile + 4 + 16 * k), line, fill=(30, 30, 30), font=small)
    return sheet
