"""Reading the non-image inputs of a request from files: saved face embeddings and face keypoints."""

from __future__ import annotations

import json

import numpy as np

from .errors import IdcraftError

#: What a saved face embedding file is expected to be (named in every message about one).
EMBEDDING_FILES = (
    "a .npy/.npz/.safetensors file with one 512-d face embedding (as `idcraft faces --save-embeddings` writes)"
)


def load_embedding(path: str):
    """A saved embedding as a flat float32 vector: ``.npy`` (NumPy), ``.npz`` (its only array, or the one
    named ``embedding``) or ``.safetensors`` (likewise). The kind is read from the file's first bytes, so
    a text file or an image given by mistake gets idcraft's message, not NumPy's advice to unpickle."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise IdcraftError(f"{path}: cannot read this face embedding ({exc.strerror or exc}).") from exc
    try:
        if head.startswith(b"\x93NUMPY"):
            vector = np.load(path, allow_pickle=False)
        elif head.startswith(b"PK\x03\x04"):
            with np.load(path, allow_pickle=False) as archive:
                vector = _one_array(path, dict(archive))
        elif len(head) == 8 and 2 <= int.from_bytes(head, "little") < 100 * 2**20 and _is_safetensors(path):
            from safetensors.numpy import load_file

            vector = _one_array(path, load_file(path))
        else:
            raise IdcraftError(f"{path}: not a face embedding file: expected {EMBEDDING_FILES}.")
    except IdcraftError:
        raise
    except Exception as exc:  # ValueError, OSError, zipfile and safetensors errors: damaged inside
        raise IdcraftError(
            f"{path}: cannot read this face embedding ({type(exc).__name__}); expected {EMBEDDING_FILES}."
        ) from exc
    if vector.ndim != 1 and not (vector.ndim == 2 and vector.shape[0] == 1):
        raise IdcraftError(f"{path}: expected one embedding vector, got an array of shape {vector.shape}.")
    if vector.dtype.kind not in "fiu":
        raise IdcraftError(f"{path}: the embedding holds {vector.dtype} values, not numbers.")
    return vector.reshape(-1).astype(np.float32)


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return f.read(1) == b"{" and size > 0


def _one_array(path: str, arrays: dict) -> np.ndarray:
    if "embedding" in arrays:
        return np.asarray(arrays["embedding"])
    if len(arrays) != 1:
        raise IdcraftError(
            f"{path}: holds {len(arrays)} arrays ({', '.join(sorted(arrays)[:5])}); expected one, or one named "
            "'embedding'."
        )
    return np.asarray(next(iter(arrays.values())))


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
