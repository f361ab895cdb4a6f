"""Reading the non-image inputs of a request from files: saved face embeddings and face keypoints."""

from __future__ import annotations

import json

import numpy as np

from .errors import IdcraftError


def load_embedding(path: str):
    """A saved embedding (``.npy``), as a flat float32 vector."""
    try:
        vector = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IdcraftError(
            f"{path}: cannot read this face embedding ({exc}); expected a .npy array."
        ) from exc
    if vector.ndim != 1 and not (vector.ndim == 2 and vector.shape[0] == 1):
        raise IdcraftError(f"{path}: expected one embedding vector, got an array of shape {vector.shape}.")
    return vector.reshape(-1).astype(np.float32)


def load_keypoints(path: str):
    """Five ``[x, y]`` pairs per face from a JSON file (a list, or ``{"kps": [...]}`` as ``idcraft faces
    --json`` writes per face), kept at JSON's own precision."""

    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError) as exc:
        raise IdcraftError(
            f"{path}: cannot read keypoints ({exc}); expected JSON like [[x, y], ... 5 pairs]."
        ) from exc
    if isinstance(data, dict):
        data = data.get("kps", data.get("keypoints"))
    try:
        kps = np.asarray(data, dtype=np.float64) if data is not None else np.zeros(0)
    except (TypeError, ValueError):
        kps = np.zeros(0)
    if kps.ndim not in (2, 3) or kps.shape[-2:] != (5, 2):
        raise IdcraftError(
            f"{path}: expected five [x, y] pairs (eyes, nose, mouth corners) per face, got shape {kps.shape}."
        )
    if not np.isfinite(kps).all():
        raise IdcraftError(f"{path}: the keypoints hold a NaN or infinite value.")
    return kps
