"""The main job on the offline default, with no downloads.

Until the bundled miniature world (trained models) ships, the demo builds tiny random-weight models with
the real SD1.5 structure, writes them to disk in the formats real models use (diffusers folders, an
official-layout adapter file) and runs the same ``IPAdapterPipeline`` a user runs on real checkpoints, at
several adapter scales. The images show the plumbing, not identity transfer: the weights are random.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SCALES = (0.0, 0.5, 1.0)


def reference_character(size: int = 128) -> Image.Image:
    """A procedural stand-in for a reference photo: a round character with eyes and a scarf."""
    img = Image.new("RGB", (size, size), (235, 225, 200))
    d = ImageDraw.Draw(img)
    s = size / 128
    d.ellipse([28 * s, 20 * s, 100 * s, 100 * s], fill=(70, 140, 220))
    for x in (48, 72):
        d.ellipse([(x - 7) * s, 45 * s, (x + 7) * s, 59 * s], fill="white")
        d.ellipse([(x - 3) * s, 49 * s, (x + 3) * s, 55 * s], fill="black")
    d.arc([48 * s, 60 * s, 80 * s, 82 * s], 20, 160, fill=(30, 30, 30), width=max(1, int(2 * s)))
    d.rectangle([34 * s, 92 * s, 94 * s, 104 * s], fill=(210, 50, 60))
    return img


def build_models(directory: Path) -> dict[str, Path]:
    """Write a tiny SD1.5 base, CLIP image encoder and IP-Adapter-Plus file; return their paths."""
    from .checkpoints import save_checkpoint
    from .tiny import random_adapter, tiny_image_encoder, tiny_sd15_pipeline

    paths = {
        "base": directory / "base",
        "image_encoder": directory / "image_encoder",
        "adapter": directory / "ip-adapter-plus_tiny.safetensors",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    pipe = tiny_sd15_pipeline(seed=0)
    encoder = tiny_image_encoder(seed=0)
    pipe.save_pretrained(paths["base"])
    encoder.save_pretrained(paths["image_encoder"])
    save_checkpoint(
        random_adapter(pipe.unet, "ip-adapter-plus", encoder, seed=0).to_checkpoint(), paths["adapter"]
    )
    return paths


def run_demo(output: str | Path, prompt: str = "a character on a beach", seed: int = 0) -> Path:
    from .pipeline import IPAdapterPipeline

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = build_models(output / "models")
    reference = reference_character()
    reference.save(output / "reference.png")
    pipe = IPAdapterPipeline.from_pretrained(
        paths["base"], paths["adapter"], paths["image_encoder"], device="cpu"
    )
    tokens = pipe.encode_references([reference])
    tiles = [reference.resize((128, 128))]
    for scale in SCALES:
        image = pipe(
            prompt,
            tokens=tokens,
            scale=scale,
            seed=seed,
            steps=10,
            guidance=5.0,
            width=64,
            height=64,
            progress=False,
        )[0]
        image.save(output / f"scale-{scale:.1f}.png")
        tiles.append(image.resize((128, 128), Image.NEAREST))
    grid = _labelled_row(tiles, ["reference"] + [f"scale {s:.1f}" for s in SCALES])
    grid.save(output / "grid.png")
    spread = [float(np.abs(np.asarray(t, float) - np.asarray(tiles[1], float)).mean()) for t in tiles[2:]]
    print(
        f"idcraft demo: tiny random-weight SD1.5 + IP-Adapter-Plus (placeholder for the bundled world), "
        f"{time.perf_counter() - start:.1f} s"
    )
    for scale, diff in zip(SCALES[1:], spread, strict=False):
        print(f"  scale {scale:.1f}: mean |image - scale 0.0 image| = {diff:.1f}/255")
    print(f"  wrote {output / 'grid.png'}")
    return output / "grid.png"


def _labelled_row(tiles: list[Image.Image], labels: list[str]) -> Image.Image:
    width, height = tiles[0].size
    row = Image.new("RGB", (width * len(tiles), height + 16), "white")
    draw = ImageDraw.Draw(row)
    for i, (tile, label) in enumerate(zip(tiles, labels, strict=False)):
        row.paste(tile, (i * width, 16))
        draw.text((i * width + 4, 2), label, fill="black")
    return row
