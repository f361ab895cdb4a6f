"""Rendered samples as arrays: the in-memory form the world's own models are trained on.

The bundled models (VAE, text encoder, UNet, CLIP vision tower, identity encoder, judge) train on tens of
thousands of renders; going through PNG files and a manifest (:mod:`.dataset`, the format ``idcraft
train`` reads) would cost more than the training. :func:`render_arrays` renders sample ``i`` exactly as
:func:`.dataset.sample_for` does -- same identities, scenes, jitter and captions for the same ``seed`` --
in parallel worker processes, and keeps images and every label in numpy arrays, optionally cached in one
``.npz`` file.

Labels are indices into the value tuples of :data:`.identity.ATTRIBUTES` and
:data:`.scene.SCENE_ATTRIBUTES`, in those dictionaries' order, so a classifier head ``k`` predicts
``ATTRIBUTE_NAMES[k]``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .backgrounds import backdrop
from .captions import caption
from .dataset import _rng, parallel_map, sample_for
from .identity import ATTRIBUTES, held_out_ids, identity_from_id, train_ids
from .render import SUPERSAMPLE, render_reference
from .scene import SCENE_ATTRIBUTES, random_scene

ATTRIBUTE_NAMES: tuple[str, ...] = tuple(ATTRIBUTES)
SCENE_NAMES: tuple[str, ...] = tuple(SCENE_ATTRIBUTES)


@dataclass
class WorldArrays:
    """``N`` rendered samples: images and ground truth, row ``i`` describing sample ``i``."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: np.ndarray  # str [N]: the caption naming the coarse identity (shape, colour)
    scene_captions: np.ndarray  # str [N]: the same scene with no identity words ("a small creature ...")
    identity_ids: np.ndarray  # int64 [N]
    attributes: np.ndarray  # int64 [N, len(ATTRIBUTE_NAMES)]: value index of each identity attribute
    scene: np.ndarray  # int64 [N, len(SCENE_NAMES)]: value index of each captioned scene attribute
    kps: np.ndarray  # float32 [N, 5, 2]: eyes, nose, mouth corners (output pixels)
    face_bbox: np.ndarray  # float32 [N, 4]: the body that carries the face, x0 y0 x1 y1 (pixel edges)
    bbox: np.ndarray  # float32 [N, 4]: the whole character

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray | Sequence[int] | slice) -> WorldArrays:
        return WorldArrays(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **{f.name: getattr(self, f.name) for f in fields(self)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WorldArrays:
        with np.load(path) as data:
            return cls(**{f.name: data[f.name] for f in fields(cls)})


def attribute_labels(attributes: dict[str, str]) -> list[int]:
    """Value indices of an identity's attributes, in :data:`ATTRIBUTE_NAMES` order."""
    return [ATTRIBUTES[name].index(attributes[name]) for name in ATTRIBUTE_NAMES]


def _render_one(job: tuple[int, int, tuple[int, ...], int]) -> tuple:
    seed, index, ids, size = job
    sample = sample_for(seed, index, ids, size)
    scene_text = caption(None, sample.scene, _rng(seed, index, 2))
    return (
        np.asarray(sample.image, dtype=np.uint8),
        sample.caption,
        scene_text,
        sample.identity.id,
        attribute_labels(sample.identity.attributes()),
        [SCENE_ATTRIBUTES[name].index(getattr(sample.scene, name)) for name in SCENE_NAMES],
        sample.kps,
        sample.face_bbox,
        sample.bbox,
    )


#: Added to a trainer's seed for its held-out evaluation renders, so they never repeat its training draws.
EVAL_SEED_OFFSET = 7919


def held_out_arrays(num_samples: int, seed: int) -> WorldArrays:
    """The renders a trainer evaluates on: ``num_samples`` samples of the held-out identities only, with
    the trainer's ``seed`` moved by :data:`EVAL_SEED_OFFSET`."""
    return render_arrays(num_samples, seed=seed + EVAL_SEED_OFFSET, ids=held_out_ids())


def render_arrays(
    num_samples: int,
    seed: int = 0,
    ids: Sequence[int] | None = None,
    size: int = 64,
    workers: int | None = None,
    cache: str | os.PathLike | None = None,
) -> WorldArrays:
    """Samples ``0 .. num_samples-1`` of the dataset with ``seed`` over ``ids`` (default: the training
    ids), rendered with ``workers`` processes (default: every core). With ``cache``, a folder: reuse the
    ``.npz`` made by an earlier call with the same arguments, or write it."""
    ids = tuple(train_ids() if ids is None else (int(i) for i in ids))
    path = None
    if cache is not None:
        key = hashlib.blake2b(repr((num_samples, seed, ids, size)).encode(), digest_size=8).hexdigest()
        path = Path(cache) / f"world-{num_samples}-{seed}-{size}-{key}.npz"
        if path.is_file():
            return WorldArrays.load(path)
    rows = parallel_map(_render_one, [(seed, i, ids, size) for i in range(num_samples)], workers)
    columns = list(zip(*rows, strict=True))
    arrays = WorldArrays(
        images=np.stack(columns[0]),
        captions=np.asarray(columns[1]),
        scene_captions=np.asarray(columns[2]),
        identity_ids=np.asarray(columns[3], dtype=np.int64),
        attributes=np.asarray(columns[4], dtype=np.int64),
        scene=np.asarray(columns[5], dtype=np.int64),
        kps=np.stack(columns[6]).astype(np.float32),
        face_bbox=np.asarray(columns[7], dtype=np.float32),
        bbox=np.asarray(columns[8], dtype=np.float32),
    )
    if path is not None:
        arrays.save(path)
    return arrays


def reference_images(ids: Sequence[int], size: int = 64) -> np.ndarray:
    """The canonical reference portrait of each id, uint8 ``[len(ids), size, size, 3]``."""
    return np.stack([np.asarray(render_reference(identity_from_id(int(i)), size).image) for i in ids])


def empty_scenes(num: int, seed: int = 0, size: int = 64) -> np.ndarray:
    """``num`` backdrops with no character, uint8 ``[num, size, size, 3]``: negatives for a detector."""
    from PIL import Image

    out = []
    for index in range(num):
        scene = random_scene(_rng(seed, index, 3))
        image = backdrop(scene.background, scene.variant, SUPERSAMPLE * size)
        out.append(np.asarray(image.convert("RGB").resize((size, size), Image.LANCZOS), dtype=np.uint8))
    return np.stack(out)
