"""Datasets of rendered samples in ``idcraft train``'s JSONL manifest format, with full ground truth.

``write_dataset`` writes ``images/*.png``, ``references/*.png`` and ``manifest.jsonl``, one line per
sample::

    {"image": "images/000000.png", "text": "a small red round creature ...",
     "reference": "references/id_0042.png", "loss_mask": "masks/000000.png",
     "identity_id": 42, "attributes": {...}, "scene": {...}, "kps": [[x, y] x 5], "bbox": [...],
     "face_bbox": [...], "placement": {...}, "reference_kps": [...], "reference_bbox": [...]}

``image``/``text``/``reference``/``loss_mask``/``kps`` are what :func:`idcraft.training.data.list_records`
reads; the other fields are ground truth for the later steps (identity encoder labels, the judge's
classifiers). The loss mask (:func:`subject_weights`) weights the character's box 4x and its face's box 7x
the background: a small character in a scene is a few percent of the pixels, and without the mask an
adapter's loss would be spent almost entirely on the backdrop the prompt already fixes.

Sample ``i`` of a dataset depends only on ``(seed, i, ids)`` -- not on how many samples are written -- so
a larger dataset extends a smaller one with the same seed, and any sample can be re-rendered on its own
(:func:`sample_for`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import IdcraftError
from .captions import caption
from .identity import NUM_IDENTITIES, identity_from_id, resolve_identity, train_ids
from .render import Sample, render, render_reference
from .scene import Scene, random_scene

MANIFEST = "manifest.jsonl"
REFERENCE_MODES = ("canonical", "scene")
#: Extra loss weight inside the character's box and inside its face's box (the background weighs 1).
CHARACTER_WEIGHT = 3.0
FACE_WEIGHT = 3.0


def subject_weights(
    bbox: np.ndarray,
    face_bbox: np.ndarray,
    image_size: int,
    grid_size: int,
    character: float = CHARACTER_WEIGHT,
    face: float = FACE_WEIGHT,
) -> np.ndarray:
    """Per-cell loss weights ``[N, grid, grid]`` for ``N`` characters: 1 on the background, ``1 +
    character`` where a cell's centre is inside the character's box, ``1 + character + face`` inside its
    face box (``[N, 4]`` pixel-edge boxes of ``image_size`` images, mapped onto the grid)."""
    scale = grid_size / image_size
    grid = np.arange(grid_size, dtype=np.float32) + 0.5
    weights = np.ones((len(bbox), grid_size, grid_size), dtype=np.float32)
    for boxes, extra in ((bbox, character), (face_bbox, face)):
        b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.float32(scale)
        inside_x = (grid[None] >= b[:, 0:1]) & (grid[None] <= b[:, 2:3])
        inside_y = (grid[None] >= b[:, 1:2]) & (grid[None] <= b[:, 3:4])
        weights += np.float32(extra) * (inside_y[:, :, None] & inside_x[:, None, :])
    return weights


def loss_mask(sample: Sample) -> Image.Image:
    """The sample's :func:`subject_weights` as a grayscale image (face box 255), for ``idcraft train``."""
    size = sample.image.size[0]
    weights = subject_weights(np.array([sample.bbox]), np.array([sample.face_bbox]), size, size)[0]
    full = 1 + CHARACTER_WEIGHT + FACE_WEIGHT
    return Image.fromarray(np.round(weights / full * 255).astype(np.uint8))


def _rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    # SeedSequence-based PCG64: the same numbers on every platform and numpy version
    return np.random.default_rng([int(seed), int(index), stream])


def sample_for(seed: int, index: int, ids: Sequence[int] | None = None, size: int = 64) -> Sample:
    """Sample ``index`` of the dataset with ``seed`` over ``ids`` (default: :func:`train_ids`)."""
    ids = train_ids() if ids is None else ids
    rng = _rng(seed, index)
    identity = resolve_identity(ids[int(rng.integers(len(ids)))])
    return render(identity, random_scene(rng), size, rng)


def _scene_reference(sample: Sample, seed: int, index: int, size: int) -> Sample:
    """The same identity in another random scene (differing in at least the background or pose)."""
    rng = _rng(seed, index, 1)
    while True:
        scene = random_scene(rng)
        if (scene.background, scene.pose) != (sample.scene.background, sample.scene.pose):
            return render(sample.identity, scene, size, rng)


def write_dataset(
    out_dir: str | os.PathLike,
    num_samples: int,
    seed: int = 0,
    ids: Sequence[int] | None = None,
    paired: bool = True,
    reference: str = "canonical",
    size: int = 64,
    workers: int | None = 1,
    scene_only_captions: bool = False,
) -> Path:
    """Render ``num_samples`` samples of identities ``ids`` (default: every training id, never a held-out
    one) into ``out_dir`` and return the manifest path.

    ``paired``: give each sample a ``reference`` -- its identity's canonical portrait (``reference=
    "canonical"``, one file per identity, shared) or the identity in a different scene (``"scene"``, one
    file per sample). Unpaired samples are their own reference, as in the official IP-Adapter setup.

    ``scene_only_captions``: captions that name no identity attribute at all (canonical template), so an
    adapter trained on them has to carry even the coarse identity -- the quickest thing to learn, which
    the CI retraining test relies on.
    """
    if num_samples < 1:
        raise IdcraftError(f"--samples {num_samples}: expected at least 1.")
    if reference not in REFERENCE_MODES:
        raise IdcraftError(f"reference={reference!r}: expected one of {REFERENCE_MODES}.")
    ids = tuple(train_ids() if ids is None else (int(i) for i in ids))
    if not ids:
        raise IdcraftError("no identity ids to render.")
    bad = [i for i in ids if not 0 <= i < NUM_IDENTITIES]
    if bad:
        raise IdcraftError(f"identity id {bad[0]}: expected 0 to {NUM_IDENTITIES - 1}.")
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    if paired:
        (root / "references").mkdir(exist_ok=True)
    jobs = [
        (root, seed, index, ids, size, paired, reference, scene_only_captions) for index in range(num_samples)
    ]
    entries = parallel_map(_write_one, jobs, workers)
    if paired and reference == "canonical":  # one portrait per identity, shared by its samples
        for identity_id in sorted({entry["identity_id"] for entry in entries}):
            _canonical(identity_id, size).image.save(root / f"references/id_{identity_id:04d}.png")
    manifest = root / MANIFEST
    with manifest.open("w", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")
    info = {
        "generator": "idcraft.world",
        "num_samples": num_samples,
        "seed": seed,
        "size": size,
        "paired": paired,
        "reference": reference if paired else None,
        "scene_only_captions": scene_only_captions,
        "num_ids": len(ids),
        "ids": list(ids),
    }
    (root / "world.json").write_text(json.dumps(info) + "\n", encoding="utf-8")
    return manifest


def _write_one(job: tuple) -> dict:
    """Render and save sample ``index``; return its manifest entry."""
    root, seed, index, ids, size, paired, reference, scene_only_captions = job
    sample = sample_for(seed, index, ids, size)
    name = f"images/{index:06d}.png"
    sample.image.save(root / name)
    mask = f"masks/{index:06d}.png"
    loss_mask(sample).save(root / mask)
    text = caption(None, sample.scene) if scene_only_captions else sample.caption
    entry: dict = {"image": name, "text": text, "loss_mask": mask}
    if paired:
        if reference == "canonical":
            entry["reference"] = f"references/id_{sample.identity.id:04d}.png"
            ref = _canonical(sample.identity.id, size)
        else:
            entry["reference"] = f"references/{index:06d}.png"
            ref = _scene_reference(sample, seed, index, size)
            ref.image.save(root / entry["reference"])
    entry.update(sample.ground_truth())
    if paired:
        entry["reference_kps"] = ref.ground_truth()["kps"]
        entry["reference_bbox"] = ref.ground_truth()["bbox"]
    return entry


def parallel_map(fn, jobs: list, workers: int | None) -> list:
    """``[fn(job) for job in jobs]`` in ``workers`` forked processes (``None``: every core), in order."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(jobs) < 64:
        return [fn(job) for job in jobs]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(fn, jobs, chunksize=max(1, len(jobs) // (workers * 8)))


@lru_cache(maxsize=1024)
def _canonical(identity_id: int, size: int) -> Sample:
    return render_reference(identity_from_id(identity_id), size)


def load_manifest(path: str | os.PathLike) -> list[dict]:
    """The entries of a world manifest (a ``manifest.jsonl`` or the folder holding it), with ``image``
    and ``reference`` resolved to absolute paths; ground-truth fields as written (JSON types)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise IdcraftError(f"{path}: no such manifest.")
    root = path.parent.resolve()
    entries = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            entry = json.loads(line)
            for key in ("image", "reference"):
                if isinstance(entry.get(key), str):
                    entry[key] = str(root / entry[key])
            entries.append(entry)
    return entries


def scene_of(entry: dict) -> Scene:
    """The :class:`Scene` of a manifest entry."""
    return Scene.from_dict(entry["scene"])
