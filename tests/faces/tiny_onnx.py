"""Tiny ONNX stand-ins for insightface's SCRFD detector and ArcFace recogniser, built by the tests.

They have the real models' signatures (SCRFD: one ``1x3xHxW`` input, 9 outputs = scores / box distances /
keypoint distances for strides 8, 16, 32 with 2 anchors per location, shaped like det_10g's; ArcFace:
``1x3x112x112`` in, ``1x512`` out) and outputs designed so a test knows exactly what a correct decoder must
report:

* :class:`TinySCRFD` scores a stride-``fire_stride`` cell ~1 when the cell is (almost) all white in the
  detector input (mean of the normalised pixels > 0.5), else ~0, per anchor times ``anchor_gain``; every
  anchor predicts constant box and keypoint distances (in stride units). ``max_width`` closes the score
  gate when the detector input is wider, to exercise the retries at smaller detector sizes.
* :class:`TinyArcFace` outputs the per-channel means of its input in its first 3 values (so a test sees the
  normalisation and channel order), then a fixed random projection of an 8x8-pooled image.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

STRIDES = (8, 16, 32)


class TinySCRFD(torch.nn.Module):
    def __init__(
        self,
        box_dist: Sequence[Sequence[float]],
        kps_dist: Sequence[Sequence[float]],
        fire_stride: int | None = 32,
        anchor_gain: Sequence[float] = (1.0, 0.0),
        max_width: float | None = None,
        batched: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("box_dist", torch.tensor(box_dist, dtype=torch.float32).reshape(2, 4))
        self.register_buffer("kps_dist", torch.tensor(kps_dist, dtype=torch.float32).reshape(2, 10))
        self.register_buffer("gain", torch.tensor(anchor_gain, dtype=torch.float32).reshape(1, 1, 2))
        self.fire_stride = fire_stride
        self.max_width = max_width
        self.batched = batched

    def forward(self, x: torch.Tensor):
        width = torch.ones_like(x[0, 0, 0, :]).sum()  # input width as data, not as a shape constant
        gate = (
            torch.sigmoid(10.0 * (self.max_width + 0.5 - width)) if self.max_width else torch.ones_like(width)
        )
        scores, boxes, kpss = [], [], []
        for stride in STRIDES:
            cell = F.avg_pool2d(x, stride).mean(1)[0]  # (h, w): mean normalised value of each cell
            hit = torch.sigmoid(40.0 * (cell - 0.5)).unsqueeze(-1)  # (h, w, 1)
            if stride != self.fire_stride:
                hit = hit * 0.0
            score = (hit * self.gain * gate).reshape(-1, 1)  # anchors of one location consecutive
            ones = torch.ones_like(cell).reshape(-1, 1, 1)
            box = (ones * self.box_dist).reshape(-1, 4)
            kps = (ones * self.kps_dist).reshape(-1, 10)
            if self.batched:
                score, box, kps = score.unsqueeze(0), box.unsqueeze(0), kps.unsqueeze(0)
            scores.append(score)
            boxes.append(box)
            kpss.append(kps)
        return (*scores, *boxes, *kpss)


class TinyArcFace(torch.nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(3 * 14 * 14, 509, generator=generator) / 20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.mean(dim=(2, 3))
        pooled = F.avg_pool2d(x, 8).flatten(1)
        return torch.cat([means, pooled @ self.projection], dim=1)


def export(module: torch.nn.Module, path: Path, input_size: tuple[int, int], dynamic: bool) -> Path:
    """Export ``module`` to ONNX at ``path`` with input ``input.1`` (dynamic height/width if asked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(1, 3, *input_size),)
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # the TorchScript exporter is ~20x faster than dynamo for these graphs
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=["input.1"],
                dynamo=False,
                opset_version=17,
                dynamic_axes={"input.1": {2: "height", 3: "width"}} if dynamic else None,
            )
        except Exception:  # exporter not available in this torch: use dynamo (needs onnxscript)
            shapes = None
            if dynamic:
                shapes = (
                    {
                        2: torch.export.Dim("height", min=32, max=4096),
                        3: torch.export.Dim("width", min=32, max=4096),
                    },
                )
            torch.onnx.export(
                module, example, str(path), input_names=["input.1"], dynamo=True, dynamic_shapes=shapes
            )
    return path


def face_like_kps_dist() -> list[list[float]]:
    """Keypoint offsets (stride units) for both anchors: eyes, nose, mouth corners around the anchor."""
    kps = [-0.5, -0.5, 0.5, -0.5, 0.0, 0.0, -0.4, 0.6, 0.4, 0.6]
    return [kps, [value * 0.9 for value in kps]]


def build_scrfd(path: Path, *, dynamic: bool = True, **kwargs) -> Path:
    kwargs.setdefault("box_dist", [[1.0, 1.5, 2.0, 2.5], [1.0, 1.5, 2.0, 2.2]])
    kwargs.setdefault("kps_dist", face_like_kps_dist())
    return export(TinySCRFD(**kwargs), path, (640, 640), dynamic)


def build_arcface(path: Path, seed: int = 0) -> Path:
    return export(TinyArcFace(seed), path, (112, 112), dynamic=False)


def white_cell_image(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A black RGB image with a white rectangle ``box = (x1, y1, x2, y2)``."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 255
    return image


def tiny_face_photo(path: Path, seed: int = 5) -> Path:
    """A 64x64 photo the tiny detector finds one face in: dark noise with a white 20 px square."""
    image = np.random.default_rng(seed).integers(0, 110, (64, 64, 3)).astype(np.uint8)
    image[16:36, 18:38] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
