"""PuLID's image chain before EVA-CLIP: 512 alignment, face parsing -> whitened/gray face, resize + normalise.

Order and numbers follow the official ``get_id_embedding`` (pulid/pipeline_v1_1.py):

1. the face is warped onto facexlib's FFHQ 512x512 five-point template (``cv2.estimateAffinePartial2D``
   with LMEDS, constant grey border), see :func:`align_face`;
2. BiSeNet labels it (input: RGB/255 with ImageNet mean/std, :func:`parsing_input`); background, cloth,
   hat, ears, earring, neck and necklace become white and the rest grey (:func:`face_features_image`);
3. the result is resized to the EVA tower's input size and normalised with OpenAI CLIP mean/std
   (:func:`eva_input`). The official code pins torchvision 0.15.2, whose tensor ``resize`` did not
   antialias: plain bicubic ``interpolate`` (align_corners False), no clamp for float tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FaceError, IdcraftError

#: facexlib's FaceRestoreHelper template for a 512x512 face (eyes, nose, mouth corners; FFHQ alignment).
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)
#: facexlib's warp border colour, (135, 133, 132) in BGR, here as RGB.
BORDER_RGB = (132, 133, 135)
#: CelebAMask-HQ labels PuLID whitens: background, cloth, hat, left/right ear, earring, neck, necklace.
WHITENED_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ALIGNED_SIZE = 512


def align_face(image: np.ndarray, kps: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """``image`` (HxWx3 uint8 RGB) warped so the 5 keypoints ``kps`` land on the FFHQ template -> size^2."""
    from ..faces._optional import cv2 as _cv2

    cv2 = _cv2()
    template = FFHQ_TEMPLATE_512 * (size / 512.0)
    matrix = cv2.estimateAffinePartial2D(np.asarray(kps, dtype=np.float64), template, method=cv2.LMEDS)[0]
    if matrix is None:
        raise FaceError("the face keypoints are degenerate; cannot align the face (pass --aligned-face).")
    return cv2.warpAffine(
        np.ascontiguousarray(image),
        matrix,
        (size, size),
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=BORDER_RGB,
    )


def check_aligned(face: np.ndarray, what: str = "--aligned-face") -> np.ndarray:
    """An aligned face must be a 512x512 RGB image (it skips detection and alignment)."""
    face = np.asarray(face)
    if face.shape != (ALIGNED_SIZE, ALIGNED_SIZE, 3):
        raise IdcraftError(
            f"{what} must be a {ALIGNED_SIZE}x{ALIGNED_SIZE} RGB face aligned as facexlib does, "
            f"got shape {face.shape}."
        )
    return face


def check_parsing(labels: np.ndarray, what: str = "--face-parsing") -> np.ndarray:
    """A parsing map is 512x512 integer labels (CelebAMask-HQ, 0..18), one per pixel of the aligned face."""
    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[2] in (3, 4):
        labels = labels[..., 0]
    if labels.shape != (ALIGNED_SIZE, ALIGNED_SIZE) or labels.max(initial=0) > 18:
        raise IdcraftError(
            f"{what} must be a {ALIGNED_SIZE}x{ALIGNED_SIZE} map of CelebAMask-HQ labels 0..18 "
            f"(one channel), got shape {labels.shape} with maximum {labels.max(initial=0)}."
        )
    return labels.astype(np.int64)


def face_tensor(face: np.ndarray, device=None) -> torch.Tensor:
    """512x512x3 uint8 RGB -> ``[1, 3, 512, 512]`` float32 in [0, 1] (basicsr's img2tensor / 255)."""
    return (
        torch.from_numpy(np.array(face, dtype=np.uint8)).permute(2, 0, 1)[None].float().div(255.0).to(device)
    )


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - m) / s


def parsing_input(face: torch.Tensor) -> torch.Tensor:
    """What BiSeNet reads: the [0, 1] RGB face with ImageNet mean/std."""
    return _normalise(face, IMAGENET_MEAN, IMAGENET_STD)


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma replicated to three channels."""
    gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return gray.repeat(1, 3, 1, 1)


def face_features_image(face: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the face's features: whitened labels -> white, everything else -> grey.

    ``face`` ``[N, 3, H, W]`` in [0, 1]; ``labels`` ``[N, 1, H, W]`` (or ``[N, H, W]``) integers."""
    if labels.ndim == 3:
        labels = labels[:, None]
    whiten = torch.zeros_like(labels, dtype=torch.bool)
    for label in WHITENED_LABELS:
        whiten |= labels == label
    return torch.where(whiten, torch.ones_like(face), to_gray(face))


def resize_bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision 0.15.2 ``resize(x, size, BICUBIC)`` on a float tensor: shorter side -> ``size``,
    no antialias, no clamp."""
    height, width = x.shape[-2:]
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(size * long / short)
    out = (size, new_long) if height <= width else (new_long, size)
    if (height, width) == out:
        return x
    return F.interpolate(x, size=out, mode="bicubic", align_corners=False, antialias=False)


def eva_input(
    image: torch.Tensor,
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """The face-features image resized to the EVA tower's input and CLIP-normalised."""
    return _normalise(resize_bicubic(image, size), mean, std)


def read_label_map(source) -> np.ndarray:
    """A face-parsing label map from a PNG path (one channel: mode L/P/I; RGB with equal channels is read
    from its first channel) or an array, checked by :func:`check_parsing`."""
    if isinstance(source, np.ndarray):
        return check_parsing(source)
    from PIL import Image

    name = getattr(source, "filename", None) or str(source)
    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        labels = np.asarray(image)
    except (OSError, ValueError) as exc:
        raise IdcraftError(f"--face-parsing {name}: cannot read this label map ({exc}).") from exc
    return check_parsing(labels, f"--face-parsing {name}")
