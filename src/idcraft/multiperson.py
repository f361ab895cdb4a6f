"""Several people in one image: where each face goes and which part of the image each identity owns.

Each person keeps their own identity tokens; the canvas is split into one region per person (every
position belongs to the face whose centre is nearest horizontally), and the adapter's and IdentityNet's
cross-attention in each region sees only that person's tokens (:func:`idcraft.injection.regional_attention`),
so identities do not blend. InstantID's IdentityNet gets every face's keypoints in one image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .injection import Region


def faces_of_group_photo(analyser, photo: Image.Image, *, embed: bool) -> list:
    """Every face of one group photo (``--multi-person`` with a single reference), largest first.

    A backend that finds one subject per image (the offline world's) cannot split a group photo into
    people: say so, and how to give them, rather than "no face found" or a silent single person."""
    from .faces import NoFaceError
    from .faces.analyser import image_name

    faces = analyser.detect(photo, embed=embed)
    if analyser.max_faces is not None and analyser.max_faces < 2:
        width, height = photo.size
        seen = "no character it recognises" if not faces else "one character"
        raise NoFaceError(
            f"{image_name(photo)}: --multi-person with one group photo needs a face backend that finds several "
            f"faces in one image; the {analyser.name} backend finds at most {analyser.max_faces} per image (in "
            f"this {width}x{height} image: {seen}). Give each person as their own --reference (one image "
            "each) with --multi-person."
        )
    return faces


def place_faces(
    keypoints: Sequence[np.ndarray], frames: Sequence[tuple[int, int]], canvas: tuple[int, int]
) -> list[np.ndarray]:
    """Keypoints of faces from separate photos, placed side by side on ``canvas`` (width, height).

    Face ``i`` goes into the ``i``-th of equal vertical strips, its photo scaled to fit the strip and
    centred, so faces keep their size relative to their photo. Faces that already share one frame (several
    faces in one photo, or keypoints given in output pixels) should not be placed again.
    """
    width, height = canvas
    strip = width / len(keypoints)
    placed = []
    for i, (kps, (frame_w, frame_h)) in enumerate(zip(keypoints, frames, strict=True)):
        scale = min(strip / frame_w, height / frame_h)
        offset = np.array([i * strip + (strip - frame_w * scale) / 2, (height - frame_h * scale) / 2])
        placed.append(np.asarray(kps) * scale + offset)
    return placed


def region_masks(
    keypoints: Sequence[np.ndarray], canvas: tuple[int, int], grid: tuple[int, int]
) -> list[torch.Tensor]:
    """One ``grid``-sized (rows, cols) mask per face, partitioning the canvas: every position belongs to
    the face whose keypoint centre is nearest in x."""
    width, _ = canvas
    rows, cols = grid
    centres = np.array([np.asarray(k)[:, 0].mean() for k in keypoints]) * cols / width
    x = np.arange(cols) + 0.5
    owner = np.abs(x[None, :] - centres[:, None]).argmin(axis=0)
    return [
        torch.from_numpy(np.repeat((owner == i)[None, :], rows, axis=0).astype(np.float32))
        for i in range(len(keypoints))
    ]


def regions_for(tokens_per_person: int, masks: Sequence[torch.Tensor]) -> list[Region]:
    """Token spans (person ``i`` owns tokens ``[i*T, (i+1)*T)``) paired with their masks."""
    return [Region(i * tokens_per_person, (i + 1) * tokens_per_person, mask) for i, mask in enumerate(masks)]


def keypoint_image(keypoints: Sequence[np.ndarray], canvas: tuple[int, int]) -> Image.Image:
    """Every face's keypoints drawn (InstantID's ``draw_kps``) into one image of size ``canvas``."""
    from .faces import draw_kps

    blank = Image.new("RGB", canvas)
    layers = [np.asarray(draw_kps(blank, k)) for k in keypoints]
    return Image.fromarray(np.maximum.reduce(layers))
