"""The face-training data both PuLID recipes' tests read (SDXL `pulid`, FLUX `pulid-flux`), and a tiny BiSeNet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

#: The fast settings both recipes' tests train with (the tiny models' 32 px, no drops unless a test sets them).
TRAIN_SETTINGS = dict(
    resolution=32,
    batch_size=2,
    progress=False,
    tensorboard=False,
    checkpoint_every=1000,
    drop_image=0.0,
    drop_text=0.0,
    drop_both=0.0,
    seed=1,
    learning_rate=1e-3,
)
#: Five keypoints of a face in the 700x600 reference photos (the face is aligned from them).
PHOTO_KPS = [[280, 260], [400, 258], [340, 330], [292, 400], [392, 398]]


def tiny_bisenet(path: Path) -> Path:
    """A random-weight BiSeNet of tiny widths, saved as facexlib's parsing_bisenet.pth would be."""
    from idcraft.pulid.bisenet import BiSeNet

    torch.manual_seed(0)
    torch.save(BiSeNet(width=8, context=16, fuse=24, aux=8).state_dict(), path)
    return path


def write_face_data(root: Path, caption: str = "portrait of a person") -> Path:
    """Four captioned 32 px targets with a raw 512-d embedding each; references alternate between a 512x512
    aligned face and a larger photo with the face's keypoints (``data.jsonl``), plus ``bisenet.pth``."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        y, x = np.mgrid[0:32, 0:32]
        target = np.stack([(x * (i + 3)) % 256, (y * (2 * i + 1)) % 256, rng.integers(0, 255, (32, 32))], -1)
        Image.fromarray(target.astype(np.uint8)).save(root / f"img{i}.png")
        np.save(root / f"emb{i}.npy", (rng.standard_normal(512) * 20).astype(np.float32))
        line = {"image": f"img{i}.png", "text": caption, "embedding": f"emb{i}.npy"}
        if i % 2:
            Image.fromarray(rng.integers(0, 255, (600, 700, 3)).astype(np.uint8)).save(root / f"photo{i}.png")
            line |= {"reference": f"photo{i}.png", "kps": PHOTO_KPS}
        else:
            Image.fromarray(rng.integers(0, 255, (512, 512, 3)).astype(np.uint8)).save(root / f"face{i}.png")
            line["reference"] = f"face{i}.png"
        lines.append(line)
    (root / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    tiny_bisenet(root / "bisenet.pth")
    return root
