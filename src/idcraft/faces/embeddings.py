"""Working with identity embeddings: comparing, averaging several photos, and refusing the wrong kind.

FaceID and InstantID were trained on ArcFace embeddings (512-d, insightface recognisers). Any other
embedding — notably the offline default backend's 128-d dlib descriptor — would be silently wrong input for
them, so their code calls :func:`require_arcface` first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import FaceError
from .types import ARCFACE, Face, l2_normalize

#: Length of an insightface ArcFace embedding (glintr100, w600k_r50).
ARCFACE_DIM = 512

EmbeddingSource = Face | np.ndarray


def cosine_similarity(a: EmbeddingSource, b: EmbeddingSource) -> float:
    """Cosine similarity of two embeddings (or faces): 1 = same direction, about 0 = unrelated."""
    va, vb = _vector(a), _vector(b)
    if va.shape != vb.shape:
        raise FaceError(f"cannot compare embeddings of different lengths ({va.size} and {vb.size}).")
    if isinstance(a, Face) and isinstance(b, Face) and a.embedding_kind != b.embedding_kind:
        raise FaceError(
            f"cannot compare a {a.embedding_kind} embedding with a {b.embedding_kind} one: "
            "they come from different recognisers."
        )
    return float(np.dot(l2_normalize(va), l2_normalize(vb)))


def average_embeddings(embeddings: Sequence[EmbeddingSource], normalize: bool) -> np.ndarray:
    """One embedding for several reference photos of the same person.

    ``normalize=True`` (methods that use normalised embeddings, e.g. IP-Adapter FaceID, which feeds
    ``normed_embedding``): each embedding is L2-normalised, averaged, and the mean renormalised to unit
    length, so every photo weighs the same and the result lives where the adapter expects. ``normalize=False``
    (InstantID feeds the raw ArcFace embedding): the plain mean of the raw embeddings, keeping their typical
    magnitude. Faces from different recognisers cannot be mixed.
    """
    if len(embeddings) == 0:
        raise FaceError("no embeddings to average (no reference photo had a usable face).")
    kinds = {(item.embedding_kind, item.embedding_model) for item in embeddings if isinstance(item, Face)}
    if len(kinds) > 1:
        listed = ", ".join(sorted(f"{kind} ({model})" for kind, model in kinds))
        raise FaceError(f"cannot average embeddings from different recognisers: {listed}.")
    vectors = [_vector(item) for item in embeddings]
    lengths = {vector.size for vector in vectors}
    if len(lengths) > 1:
        raise FaceError(f"cannot average embeddings of different lengths: {sorted(lengths)}.")
    if normalize:
        mean = np.mean([l2_normalize(vector) for vector in vectors], axis=0)
        return l2_normalize(mean)
    return np.mean(vectors, axis=0).astype(np.float32)


def require_arcface(source: EmbeddingSource, method_name: str) -> np.ndarray:
    """The raw ArcFace embedding of ``source``, or a :class:`FaceError` explaining why it cannot be used.

    ``source`` is a :class:`Face` (checked by the recogniser recorded on it) or a bare array such as one
    saved by ``idcraft faces --save-embeddings`` (checked by its length: ArcFace gives 512 values, dlib's
    descriptor 128). ``method_name`` (e.g. "InstantID") is named in the message.
    """
    hint = (
        f"{method_name} was trained on ArcFace embeddings from insightface's recognisers. Analyse the "
        "reference with the insightface backend (get_face_analyser('insightface', models_dir=...) or "
        "`idcraft faces --backend insightface --models DIR`), which needs the antelopev2 (InstantID) or "
        "buffalo_l (FaceID) model pack."
    )
    if isinstance(source, Face):
        if source.embedding is None:
            raise FaceError(
                f"{method_name} needs a face embedding, but this face has no embedding (analysed by "
                f"{source.backend!r} without a recogniser or with embed=False). {hint}"
            )
        if source.embedding_kind != ARCFACE:
            raise FaceError(
                f"{method_name} cannot use this face's embedding: it was made by {source.embedding_kind} "
                f"({source.embedding_model or 'unknown model'}, backend {source.backend!r}), which is not "
                f"ArcFace-compatible. {hint}"
            )
        return source.embedding
    vector = _vector(source)
    if vector.size != ARCFACE_DIM:
        origin = " (dlib's face descriptor has 128)" if vector.size == 128 else ""
        raise FaceError(
            f"{method_name} needs a {ARCFACE_DIM}-value ArcFace embedding, got {vector.size} values{origin}. "
            f"{hint}"
        )
    return vector


def _vector(item: EmbeddingSource) -> np.ndarray:
    if isinstance(item, Face):
        if item.embedding is None:
            raise FaceError("this face has no embedding (the analyser ran without a recogniser).")
        return item.embedding
    vector = np.asarray(item, dtype=np.float32)
    if vector.ndim == 2 and vector.shape[0] == 1:
        vector = vector[0]
    if vector.ndim != 1 or vector.size == 0:
        raise FaceError(f"an embedding must be a 1-D vector, got shape {vector.shape}.")
    if not np.all(np.isfinite(vector)):
        raise FaceError("embedding contains NaN or infinity.")
    return vector
