"""References -> image tokens: the first half of every adapter's data flow.

Two families of inputs reach the projection:

* **images** (IP-Adapter, Plus, Full-face): CLIP features of each whole reference image;
* **identities** (FaceID, FaceID-Plus/PlusV2, Portrait, InstantID): a face-recognition embedding per
  reference photo, and for FaceID-Plus also CLIP features of the face crop aligned by its 5 keypoints.

Each function returns :class:`ReferenceTokens`: the tokens of the references and of the unconditional
(classifier-free guidance) branch, built as the official code builds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .adapter import IPAdapter
from .encoders import ClipImageEncoder
from .errors import IdcraftError
from .registry import Method


@dataclass
class Identity:
    """One reference photo's identity: its raw recogniser embedding and, where known, the face crop
    aligned to the ArcFace template (224 px, FaceID-Plus), the 5 keypoints and the size of the image
    they are in (InstantID draws them)."""

    embedding: np.ndarray
    face_crop: Image.Image | None = None
    kps: np.ndarray | None = None
    image_size: tuple[int, int] | None = None
    photo: int = 0  # which reference photo the face is in (faces of one photo share its frame)


@dataclass
class ReferenceTokens:
    """Image tokens of the references and of the unconditional branch, each ``[1, tokens, width]``, and
    for identity methods the identities they were made from (InstantID draws their keypoints)."""

    cond: torch.Tensor
    uncond: torch.Tensor
    identities: list[Identity] | None = None
    #: several people: identity ``i`` owns tokens ``[i*T, (i+1)*T)``, and they go into separate regions
    per_person: bool = False

    @property
    def num_tokens(self) -> int:
        return self.cond.shape[1]


def _side_by_side(tokens: torch.Tensor) -> torch.Tensor:
    """``[N, T, D]`` -> ``[1, N*T, D]``: every reference keeps its own tokens."""
    return tokens.reshape(1, -1, tokens.shape[-1])


def _dtype(adapter: IPAdapter) -> torch.dtype:
    return next(adapter.image_proj.parameters()).dtype


@torch.no_grad()
def image_tokens(
    adapter: IPAdapter, encoder: ClipImageEncoder, images: Sequence[Image.Image]
) -> ReferenceTokens:
    """CLIP-image methods. N references give N x tokens-per-image tokens side by side; the cross-attention
    attends over all of them at once (as diffusers does for a list of images given to one adapter)."""
    method = adapter.method
    cond, uncond = encoder.encode(images, method.feature, method.uncond)
    dtype = _dtype(adapter)
    return ReferenceTokens(
        _side_by_side(adapter.project(cond.to(dtype))), _side_by_side(adapter.project(uncond.to(dtype)))
    )


def _per_person_tokens(adapter, identities, encoder, s_scale) -> ReferenceTokens:
    parts = [identity_tokens(adapter, [i], encoder, s_scale) for i in identities]
    return ReferenceTokens(
        torch.cat([p.cond for p in parts], dim=1),
        torch.cat([p.uncond for p in parts], dim=1),
        list(identities),
        per_person=True,
    )


def prepare_embedding(
    embedding: np.ndarray | torch.Tensor, method: Method, expected_dim: int
) -> torch.Tensor:
    """A raw identity embedding as the method's official code feeds it (L2-normalised for FaceID, raw
    for InstantID), checked against the projection's input width."""
    vector = torch.as_tensor(np.asarray(embedding, dtype=np.float32)).reshape(-1)
    if vector.numel() != expected_dim:
        raise IdcraftError(
            f"{method.name} reads a {expected_dim}-value identity embedding, got {vector.numel()} values. "
            "Use the raw ArcFace embedding (insightface's antelopev2/buffalo_l recogniser, 512 values)."
        )
    if not torch.isfinite(vector).all() or vector.norm() == 0:
        raise IdcraftError(f"{method.name}: the identity embedding is all zeros or not finite.")
    return torch.nn.functional.normalize(vector, dim=0) if method.normalize_embedding else vector


@torch.no_grad()
def identity_tokens(
    adapter: IPAdapter,
    identities: Sequence[Identity],
    encoder: ClipImageEncoder | None = None,
    s_scale: float = 1.0,
    per_person: bool = False,
) -> ReferenceTokens:
    """Identity methods.

    ``combine="average"`` (FaceID, FaceID-Plus): several photos of one person give one embedding, the
    mean of the normalised embeddings renormalised; FaceID-Plus's perceiver then reads the CLIP tokens of
    all the face crops together. ``combine="side-by-side"`` (Portrait): each photo gives its own tokens.
    The unconditional branch projects a zero embedding (and, for FaceID-Plus, CLIP features of a zero
    image), as the official code does: in a separate call for FaceID, in one batch ``[zeros; embedding]``
    for InstantID. ``per_person``: every identity is a different person and keeps
    its own tokens, whatever the method's ``combine``.
    """
    method = adapter.method
    if not identities:
        raise IdcraftError(f"{method.name} needs at least one reference face.")
    dtype = _dtype(adapter)
    device = next(adapter.image_proj.parameters()).device
    embed_dim = adapter.image_proj.config.embed_dim
    vectors = torch.stack([prepare_embedding(i.embedding, method, embed_dim) for i in identities])
    if per_person:
        return _per_person_tokens(adapter, identities, encoder, s_scale)
    if method.combine == "average" and len(identities) > 1:
        mean = vectors.mean(0, keepdim=True)
        vectors = torch.nn.functional.normalize(mean, dim=1) if method.normalize_embedding else mean
    vectors = vectors.to(device, dtype)
    zeros = torch.zeros_like(vectors)

    if method.inputs == "face":
        if method.identitynet:  # InstantID: one Resampler call on [zeros; embeddings], split, as its pipeline
            both = adapter.project(torch.cat([zeros, vectors]))
            uncond, cond = both[: len(vectors)], both[len(vectors) :]
        else:  # FaceID: two calls, embeddings then zeros, as ip_adapter_faceid.py does
            cond, uncond = adapter.project(vectors), adapter.project(zeros)
        return ReferenceTokens(_side_by_side(cond), _side_by_side(uncond), list(identities))

    if encoder is None:
        raise IdcraftError(f"{method.name} also reads CLIP features of the face crop: give an image encoder.")
    crops = [i.face_crop for i in identities]
    if any(c is None for c in crops):
        raise IdcraftError(f"{method.name} needs the aligned face crop of every reference (5 keypoints).")
    clip, clip_uncond = encoder.encode(crops, method.feature, method.uncond)
    clip = clip.to(dtype).reshape(1, -1, clip.shape[-1])  # all crops' tokens, read by one perceiver
    clip_uncond = clip_uncond.to(dtype).reshape(1, -1, clip_uncond.shape[-1])
    kwargs = {"shortcut": method.shortcut, "s_scale": s_scale}
    return ReferenceTokens(
        adapter.image_proj(vectors, clip, **kwargs),
        adapter.image_proj(zeros, clip_uncond, **kwargs),
        list(identities),
    )


def identities_from_photos(
    method: Method,
    photos: Sequence[Image.Image],
    embeddings: Sequence[np.ndarray] | None = None,
    *,
    face_backend: str = "insightface",
    face_models: str | None = None,
    face_index: int | None = None,
    every_face: bool = False,
    resize: bool = True,
) -> list[Identity]:
    """Identity inputs for ``method`` from reference photos and/or saved embeddings.

    Embeddings come from ``embeddings`` (raw recogniser output, e.g. ``idcraft faces --save-embeddings``)
    or, when none are given, from face analysis of ``photos`` with ``face_backend`` — which must give
    ArcFace embeddings: the official FaceID/InstantID checkpoints were trained on them, and another
    recogniser's embedding is refused with a message saying what to use. Keypoints come from the same
    analysis, or from the offline default detector when the embeddings were given. FaceID-Plus also gets
    each face aligned to the ArcFace template at 224 px. InstantID first resizes each photo with its
    official rule (:func:`idcraft.faces.resize_img`); its keypoints are in that image. ``resize=False``
    skips that rule (it targets SDXL's 1024 px; on an SD1.5-shaped base, such as the offline world's, it
    would blow a reference up far past the model's size).

    ``every_face``: one photo with several people gives one identity per face (largest first) instead of
    the face at ``face_index`` (``None``: each photo must show one face).
    """
    from .faces import require_arcface, resize_img

    if method.identitynet and resize:
        photos = [resize_img(p) for p in photos]
    if embeddings is None and not photos:
        raise IdcraftError(f"{method.name} needs reference photos or --face-embedding files.")
    needs_kps = method.identitynet or method.inputs == "face+image" or every_face
    analyse = embeddings is None or (needs_kps and photos)
    backend = face_backend if embeddings is None else "default"  # keypoints only: any detector will do
    faces, frames = [], []
    if analyse:
        for index, photo in enumerate(photos):
            found = _faces_of(photo, backend, face_models, face_index, every_face, embed=embeddings is None)
            faces += found
            frames += [(index, photo)] * len(found)
    if embeddings is not None:
        vectors = [require_arcface(np.asarray(e, dtype=np.float32), method.name) for e in embeddings]
        if faces and len(faces) != len(vectors):
            raise IdcraftError(
                f"{len(vectors)} face embedding(s) for {len(faces)} face(s) in the reference photos: give one "
                "embedding per face."
            )
    else:
        vectors = [require_arcface(f, method.name) for f in faces]
    if not faces:
        return [Identity(v) for v in vectors]
    return [
        Identity(
            v,
            face_crop=faceid_plus_crop(photo, f.kps) if method.inputs == "face+image" else None,
            kps=f.kps,
            image_size=photo.size,
            photo=index,
        )
        for v, f, (index, photo) in zip(vectors, faces, frames, strict=True)
    ]


def _faces_of(
    photo, backend: str, models: str | None, face_index: int | None, every_face: bool, embed: bool
) -> list:
    from .faces import analyse_reference, shared_face_analyser

    options = {"models_dir": models} if backend != "default" else {}
    if not every_face:
        return [analyse_reference(photo, backend, face_index, embed=embed, **options)]
    from .multiperson import faces_of_group_photo

    faces = faces_of_group_photo(shared_face_analyser(backend, **options), photo, embed=embed)
    if not faces:
        analyse_reference(photo, backend, 0, embed=False, **options)  # raises the no-face error
    return faces


def faceid_plus_crop(photo: Image.Image, kps: np.ndarray) -> Image.Image:
    """The 224 px aligned face crop FaceID-Plus gives CLIP, channel order included.

    The official FaceID-Plus code reads the photo with OpenCV and hands the BGR crop to the CLIP image
    processor, so CLIP sees red and blue swapped; the released weights are used that way, and so idcraft
    does the same to give the same numbers.
    """
    from .faces import norm_crop

    crop = norm_crop(np.asarray(photo.convert("RGB")), kps, 224)
    return Image.fromarray(np.ascontiguousarray(crop[..., ::-1]))
