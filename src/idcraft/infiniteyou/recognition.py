"""InfiniteYou's identity embedding: facexlib's ArcFace (IR-SE-50), not the detector pack's recogniser.

The official wrapper finds the face and its 5 keypoints with insightface's antelopev2 pack, but embeds it
with ``facexlib.recognition.init_recognition_model('arcface')``: an IR-SE-50 ResNet
(``recognition_arcface_ir_se50.pth``) whose output is L2-normalised. Its input is the 112 x 112 crop of
``norm_crop`` on the *BGR* image, scaled to [-1, 1] (channel order BGR kept). The network here is written
from that architecture with the same parameter names, so the user's file loads with ``weights_only=True``
and ``strict=True``; it is found in the ``--face-models`` folder (or ``$IDCRAFT_ARCFACE``).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoints import load_torch_file
from ..errors import CheckpointError, IdcraftError

WEIGHTS_FILE = "recognition_arcface_ir_se50.pth"
#: Units per stage of IR-SE-50 (64, 128, 256, 512 channels).
STAGES_50 = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * w


class _Unit(nn.Module):
    """Improved residual unit with squeeze-excitation: BN-conv-PReLU-conv-BN-SE plus a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if cin == cout:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            _SqueezeExcite(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class ArcFaceIRSE(nn.Module):
    """IR-SE ResNet face recogniser on 112 x 112 crops in [-1, 1] -> L2-normalised 512-d embedding."""

    def __init__(self, stages=STAGES_50, embedding: int = 512):
        super().__init__()
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
        )
        units = []
        for cin, cout, count in stages:
            units.append(_Unit(cin, cout, 2))
            units += [_Unit(cout, cout, 1) for _ in range(count - 1)]
        self.body = nn.Sequential(*units)
        width = stages[-1][1]
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Dropout(0.6),
            nn.Flatten(),
            nn.Linear(width * 7 * 7, embedding),
            nn.BatchNorm1d(embedding),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.output_layer(self.body(self.input_layer(x)))
        return out / out.norm(dim=1, keepdim=True)


def find_weights(models: str | os.PathLike | None) -> Path:
    """The recogniser's weights file: ``models`` itself, or ``WEIGHTS_FILE`` in it (or in a
    ``facexlib/weights`` folder below it, as facexlib stores it), else ``$IDCRAFT_ARCFACE``."""
    candidates = []
    for root in (models, os.environ.get("IDCRAFT_ARCFACE")):
        if not root:
            continue
        root = Path(root)
        candidates += [root, root / WEIGHTS_FILE, root / "facexlib" / "weights" / WEIGHTS_FILE]
    for path in candidates:
        if path.is_file():
            return path
    raise IdcraftError(
        f"infiniteyou embeds faces with facexlib's ArcFace: put {WEIGHTS_FILE} (facexlib v0.1.0 release) in "
        "the --face-models folder, or give the embedding with --face-embedding."
    )


def stages_of(state: dict[str, torch.Tensor]) -> tuple[tuple[int, int, int], ...]:
    """The ``(in, out, units)`` stages a state dict was saved from, read from its unit shapes: unit 0 and
    every unit whose width changes (it has a convolution shortcut) start a stage. IR-SE-50's file gives
    :data:`STAGES_50`; a narrower network of the same layout (tests build tiny ones) loads as what it is.
    A file without units gives :data:`STAGES_50`, so the strict load names what is wrong with it."""
    shapes = {}
    for key, value in state.items():
        match = re.fullmatch(r"body\.(\d+)\.res_layer\.1\.weight", key)
        if match and getattr(value, "ndim", 0) == 4:
            shapes[int(match.group(1))] = (int(value.shape[1]), int(value.shape[0]))
    if not shapes or sorted(shapes) != list(range(len(shapes))):
        return STAGES_50
    stages: list[list[int]] = []
    for index in range(len(shapes)):
        cin, cout = shapes[index]
        if not stages or cin != cout:
            stages.append([cin, cout, 1])
        else:
            stages[-1][2] += 1
    return tuple((cin, cout, count) for cin, cout, count in stages)


def load_recogniser(path: str | os.PathLike) -> ArcFaceIRSE:
    """The IR-SE-50 recogniser with the weights of ``path`` (strict, ``weights_only=True``)."""
    try:
        state = load_torch_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a torch file ({exc}).") from exc
    model = ArcFaceIRSE(stages_of(state))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: not facexlib's IR-SE-50 ArcFace weights ({detail}).") from exc
    return model.eval()


_CACHE: dict[Path, ArcFaceIRSE] = {}
_CACHE_LOCK = threading.Lock()


def shared_recogniser(models: str | os.PathLike | None) -> ArcFaceIRSE:
    """:func:`load_recogniser`, loaded once per file (it is read-only after loading)."""
    path = find_weights(models).resolve()
    with _CACHE_LOCK:
        if path not in _CACHE:
            _CACHE[path] = load_recogniser(path)
        return _CACHE[path]


def embed_face(recogniser: ArcFaceIRSE, rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """The official embedding of the face at ``kps`` in ``rgb``: BGR crop, [-1, 1], recogniser."""
    from ..faces.align import norm_crop

    bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
    crop = norm_crop(bgr, np.asarray(kps), 112)
    pixels = torch.from_numpy(np.ascontiguousarray(crop)).unsqueeze(0).permute(0, 3, 1, 2) / 255.0
    pixels = 2 * pixels - 1
    param = next(recogniser.parameters())
    with torch.no_grad():
        return recogniser(pixels.to(param.device, param.dtype))[0].float().cpu().numpy()


def identity_embedding(reference, backend: str, models, face_index: int | None = None) -> np.ndarray:
    """Find the face of ``reference`` with the engine's face backend (its only face, or ``face_index`` in
    largest-first order) and embed it as the official code does."""
    from ..faces import analyse_reference
    from ..images import load_image

    image = load_image(reference)
    face = analyse_reference(image, backend, face_index, models_dir=models, embed=False)
    return embed_face(shared_recogniser(models), np.asarray(image), face.kps)
