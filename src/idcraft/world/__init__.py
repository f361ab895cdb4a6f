"""The offline world: procedural characters with known identities, rendered in captioned scenes.

No real base model or face dataset can be downloaded, so idcraft ships a miniature world with the
structure of the real problem: identities whose coarse attributes can be said in words and whose fine
attributes can only be seen (:mod:`.identity`), scenes set by text (:mod:`.scene`, :mod:`.captions`),
deterministic 64x64 renders with exact ground truth -- five keypoints, boxes, every attribute
(:mod:`.render`) -- and datasets in ``idcraft train``'s manifest format (:mod:`.dataset`).
"""

from __future__ import annotations

from .captions import caption
from .dataset import load_manifest, sample_for, write_dataset
from .identity import (
    ATTRIBUTES,
    COARSE_ATTRIBUTES,
    FINE_ATTRIBUTES,
    HELD_OUT_IDS,
    NUM_IDENTITIES,
    Identity,
    all_identities,
    held_out_ids,
    identity_from_id,
    train_ids,
)
from .render import KEYPOINT_NAMES, Sample, grid, palette, render, render_reference
from .scene import SCENE_ATTRIBUTES, Scene, random_scene

__all__ = [
    "ATTRIBUTES",
    "COARSE_ATTRIBUTES",
    "FINE_ATTRIBUTES",
    "HELD_OUT_IDS",
    "KEYPOINT_NAMES",
    "NUM_IDENTITIES",
    "SCENE_ATTRIBUTES",
    "Identity",
    "Sample",
    "Scene",
    "all_identities",
    "caption",
    "grid",
    "held_out_ids",
    "identity_from_id",
    "load_manifest",
    "palette",
    "random_scene",
    "render",
    "render_reference",
    "sample_for",
    "train_ids",
    "write_dataset",
]
