"""The world's face analyser: a keypoint detector and an ArcFace-style recogniser for world characters.

It plays the role insightface's packs play for real photos -- detect, 5 keypoints, align, 512-d
embedding -- so the world's FaceID and InstantID adapters are trained and used through exactly the code
paths of the real ones (``face_backend="world"``, ``idcraft faces --backend world``). Its embeddings carry
``embedding_kind="arcface"`` because they stand in for ArcFace **inside the world only**: the recogniser
was trained with ArcFace's additive angular margin loss on world identities and knows nothing of real
faces. Never feed a real photo's embedding from it to an adapter trained on real ArcFace, nor the reverse.

Two small torch models, stored in ``identity/`` of the world bundle (:func:`save_identity_models`):

* the **detector** reads the image resized to 64x64 and gives 5 keypoints (soft-argmax over heatmaps),
  the box of the body that carries the face, and a presence logit -- a scene without a character gives
  no face, so such a photo raises :class:`~idcraft.faces.NoFaceError` as with the real backends;
* a detection also needs the image to look like the world: the presence logit was only ever trained on
  world renders and backdrops, and on anything else (a photo, noise) it says whatever it likes -- a real
  astronaut photo scores 0.998. So, like a real detector's score threshold, a face is reported only when
  the detector's own pooled features lie near those of world renders: their whitened (Mahalanobis)
  distance to the training renders' feature distribution, ``familiarity.safetensors`` (mean and
  whitening matrix, written by the trainer), must stay under ``familiarity_threshold`` (config.json).
  Measured on the shipped models: world scenes, references, JPEG copies and renders at 32-512 px stay
  under 1.35, renders cropped to zoom in up to 1.8x under 1.8 (97.5% of them); whole photos, noise, flat
  colours, diagrams measure 1.9 and more (a tight crop of a photo can come closer: 1% of random
  astronaut crops pass). The threshold is 1.8. Model folders without the file skip the check;
* the **recogniser** reads the character aligned by a similarity transform from its 5 keypoints to a
  fixed template, like ArcFace's ``norm_crop`` but with a taller frame that holds the whole character
  (ears, accessory, body pattern, feet), and returns the raw 512-d embedding (unnormalised; FaceID
  normalises it, InstantID reads it raw, as with ArcFace).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..faces.types import ARCFACE, Face, FaceAnalyser
from ..images import ImageInput, load_image

NAME = "world"
EMBEDDING_MODEL = "idcraft-world-recogniser"
CONFIG_NAME = "config.json"
DETECTOR_WEIGHTS = "detector.safetensors"
RECOGNISER_WEIGHTS = "recogniser.safetensors"
#: Mean and whitening matrix of the detector's pooled features over world renders (see the module notes).
FAMILIARITY_WEIGHTS = "familiarity.safetensors"
#: Shrinkage of the feature covariance toward its mean variance before whitening, so that directions
#: in which the renders barely vary do not make every small change look foreign.
FAMILIARITY_SHRINKAGE = 0.003
#: Lowest familiarity threshold a trainer writes: world renders measured on the shipped models stay under
#: ~1.7 even zoomed, rotated, blurred and noised as in detector training; photos and noise start near 1.9.
FAMILIARITY_FLOOR = 1.8
#: Side of the image the detector reads (renders are made at this size).
DETECT_SIZE = 64

#: Five keypoints of every world character in a frame where the eyes are one unit apart (measured on
#: renders: the face layout is the same for every character, only the body differs).
CANONICAL_KPS = ((-0.5, 0.0), (0.5, 0.0), (0.0, 0.381), (-0.303, 0.762), (0.303, 0.762))
#: The part of that frame the aligned crop shows: x0, y0, x1, y1 in eye-distance units. It holds the
#: whole character (99% of renders): horns and hats above (-3.45), feet below (2.75).
CROP_REGION = (-2.2, -3.45, 2.2, 2.75)

DEFAULT_CONFIG: dict[str, Any] = {
    "detect_size": DETECT_SIZE,
    "detector_widths": [16, 24, 48, 96],
    "presence_threshold": 0.5,
    "familiarity_threshold": FAMILIARITY_FLOOR,
    "crop_width": 28,
    "crop_height": 40,
    "recogniser_widths": [24, 32, 64, 128],
    "embedding_dim": 512,
}


def crop_template(config: dict[str, Any]) -> np.ndarray:
    """The 5 keypoints' positions in the aligned crop (pixel centres at integers, as ``norm_crop``)."""
    x0, y0, x1, y1 = CROP_REGION
    w, h = config["crop_width"], config["crop_height"]
    kps = np.asarray(CANONICAL_KPS, dtype=np.float64)
    out = np.empty_like(kps)
    out[:, 0] = (kps[:, 0] - x0) / (x1 - x0) * w - 0.5
    out[:, 1] = (kps[:, 1] - y0) / (y1 - y0) * h - 0.5
    return out.astype(np.float32)


def similarity_matrices(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transforms (rotation, uniform scale, translation; no reflection)
    ``[B, 2, 3]`` mapping each ``src[b]`` (``[B, N, 2]``) onto ``dst`` (``[N, 2]``): the closed form of
    Umeyama's method in 2-D, the estimate ArcFace alignment uses (:func:`idcraft.faces.similarity_transform`)."""
    src = src.double()
    dst = dst.to(src).expand_as(src)
    src_mean, dst_mean = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    s, d = src - src_mean, dst - dst_mean
    norm = (s**2).sum((1, 2)).clamp_min(1e-12)
    a = ((s * d).sum((1, 2))) / norm
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(1) / norm
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], 1)  # [B, 2, 2]
    shift = dst_mean[:, 0] - torch.einsum("bij,bj->bi", rot, src_mean[:, 0])
    return torch.cat([rot, shift[..., None]], 2).float()


def warp_crops(
    images: torch.Tensor, matrices: torch.Tensor, width: int, height: int, padding: str = "zeros"
) -> torch.Tensor:
    """Bilinear crops ``[B, C, height, width]`` of ``images`` ``[B, C, H, W]``: crop pixel ``(x, y)`` is
    image point ``M^-1 (x, y)`` (pixel centres at integers), zero outside the image (black, for inputs in
    [0, 255]; mid-grey for the models' [-1, 1]) as ``cv2.warpAffine`` in ``norm_crop``, or ``"border"``."""
    b, _, h, w = images.shape
    full = torch.cat([matrices, matrices.new_tensor([0.0, 0.0, 1.0]).expand(b, 1, 3)], 1)
    inverse = torch.linalg.inv(full.double()).float()[:, :2]  # crop -> image
    ys, xs = torch.meshgrid(
        torch.arange(height, device=images.device, dtype=torch.float32),
        torch.arange(width, device=images.device, dtype=torch.float32),
        indexing="ij",
    )
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1)  # [h, w, 3]
    source = torch.einsum("bij,yxj->byxi", inverse, points)  # image pixel coordinates
    scale = source.new_tensor([2.0 / w, 2.0 / h])
    grid = (source + 0.5) * scale - 1.0
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [-1, 1] (the models' input scale)."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class _Residual(nn.Module):
    """A basic ResNet block (two 3x3 convolutions), strided when it changes resolution."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class _Mixer(nn.Sequential):
    """A cheap decoder step: 1x1 convolution mixing the skip and upsampled features, then a depthwise 3x3."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(True),
            nn.Conv2d(cout, cout, 3, 1, 1, groups=cout, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(True),
        )


class WorldDetector(nn.Module):
    """A small U-Net on the 64x64 image: 7 heatmaps at 32x32 (5 keypoints, the box's top-left and
    bottom-right corners) read by soft-argmax -- sub-pixel and translation-equivariant -- and a presence
    logit from the pooled bottleneck."""

    def __init__(self, widths: list[int]):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.stem = _conv_bn(3, w0, 2)  # 32x32
        self.enc1 = _Residual(w0, w1)
        self.enc2 = _Residual(w1, w2, 2)  # 16x16
        self.enc3 = nn.Sequential(_Residual(w2, w3, 2), _Residual(w3, w3))  # 8x8
        self.dec2 = _Mixer(w3 + w2, w2)
        self.dec1 = _Mixer(w2 + w1, w1)
        self.heat = nn.Conv2d(w1, 7, 1)
        self.presence = nn.Linear(2 * w3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` ``[B, 3, 64, 64]`` in [-1, 1] -> keypoints ``[B, 5, 2]`` (pixel centres at integers), box
        ``[B, 4]`` (x0, y0, x1, y1 edges), presence logit ``[B]``."""
        kps, box, logit, _ = self.run(x)
        return kps, box, logit

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward`'s outputs plus the familiarity features ``[B, 2 * (w2 + w3)]``: the mean- and
        max-pooled activations of the two deepest encoder stages, ``log1p``-compressed (what
        :func:`familiarity_distance` measures)."""
        e1 = self.enc1(self.stem(x))
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        heat = self.heat(d1)  # [B, 7, h, w]
        b, k, h, w = heat.shape
        prob = heat.flatten(2).softmax(-1).view(b, k, h, w)
        stride_x, stride_y = x.shape[-1] / w, x.shape[-2] / h
        gx = (torch.arange(w, device=x.device, dtype=prob.dtype) + 0.5) * stride_x - 0.5
        gy = (torch.arange(h, device=x.device, dtype=prob.dtype) + 0.5) * stride_y - 0.5
        points = torch.stack([(prob.sum(2) * gx).sum(-1), (prob.sum(3) * gy).sum(-1)], -1)  # [B, 7, 2]
        pooled = torch.cat([e3.mean((2, 3)), e3.amax((2, 3))], 1)
        features = torch.cat([pooled, e2.mean((2, 3)), e2.amax((2, 3))], 1).float().clamp_min(0).log1p()
        return points[:, :5], points[:, 5:].reshape(b, 4), self.presence(pooled)[:, 0], features


class WorldRecogniser(nn.Module):
    """A small ResNet on the aligned crop -> 512-d embedding, ending as ArcFace's recognisers do
    (global depthwise pooling, linear, BatchNorm1d), so raw embeddings have ArcFace-like magnitudes."""

    def __init__(self, widths: list[int], embedding_dim: int, crop_height: int, crop_width: int):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.body = nn.Sequential(
            _conv_bn(3, w0),
            _Residual(w0, w1, 2),
            _Residual(w1, w1),
            _Residual(w1, w2, 2),
            _Residual(w2, w2),
            _Residual(w2, w3, 2),
            _Residual(w3, w3),
        )
        h, w = -(-crop_height // 8), -(-crop_width // 8)
        self.pool = nn.Sequential(nn.Conv2d(w3, w3, (h, w), groups=w3, bias=False), nn.BatchNorm2d(w3))
        self.fc = nn.Linear(w3, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Aligned crops ``[B, 3, crop_height, crop_width]`` in [-1, 1] -> raw embeddings ``[B, 512]``."""
        return self.features(self.fc(self.pool(self.body(crops)).flatten(1)))


def familiarity_statistics(features: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"mean", "whitening"}`` of familiarity features ``[N, D]`` (:meth:`WorldDetector.run`) of world
    renders: the mean, and ``W`` with ``|W (f - mean)|^2 / D`` the squared Mahalanobis distance under the
    covariance shrunk by :data:`FAMILIARITY_SHRINKAGE` (so a typical render measures about 1)."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / max(1, len(x) - 1)
    dim = cov.shape[0]
    cov = (1 - FAMILIARITY_SHRINKAGE) * cov + FAMILIARITY_SHRINKAGE * cov.trace() / dim * torch.eye(
        dim, dtype=cov.dtype
    )
    values, vectors = torch.linalg.eigh(cov)
    whitening = vectors.T / values.clamp_min(1e-12).sqrt()[:, None]
    return {"mean": mean.float().contiguous(), "whitening": whitening.float().contiguous()}


def familiarity_distance(features: torch.Tensor, statistics: dict[str, torch.Tensor]) -> torch.Tensor:
    """Whitened distance ``[B]`` of familiarity features ``[B, D]`` from the world renders' distribution
    (about 1 for a typical render; see the module notes)."""
    mean, whitening = statistics["mean"].to(features), statistics["whitening"].to(features)
    return ((features - mean) @ whitening.T).pow(2).mean(1).sqrt()


def build_models(config: dict[str, Any]) -> tuple[WorldDetector, WorldRecogniser]:
    """Fresh detector and recogniser of ``config``'s sizes."""
    detector = WorldDetector(list(config["detector_widths"]))
    recogniser = WorldRecogniser(
        list(config["recogniser_widths"]),
        config["embedding_dim"],
        config["crop_height"],
        config["crop_width"],
    )
    return detector, recogniser


def save_identity_models(
    folder: str | os.PathLike,
    detector: WorldDetector,
    recogniser: WorldRecogniser,
    config: dict[str, Any],
    familiarity: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``config.json``, ``detector.safetensors`` and ``recogniser.safetensors`` into ``folder``, and
    ``familiarity.safetensors`` when ``familiarity`` (:func:`familiarity_statistics`) is given."""
    from ..outputs import save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(DEFAULT_CONFIG)
    cfg = {k: config.get(k, DEFAULT_CONFIG[k]) for k in keys}
    if familiarity is not None:
        save_safetensors(
            {k: v.detach().cpu().float().contiguous() for k, v in familiarity.items()},
            str(folder / FAMILIARITY_WEIGHTS),
            metadata={"format": "pt"},
        )
    cfg.update(template=crop_template(config).round(4).tolist(), embedding_model=EMBEDDING_MODEL)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    for model, name in ((detector, DETECTOR_WEIGHTS), (recogniser, RECOGNISER_WEIGHTS)):
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_safetensors(state, str(folder / name), metadata={"format": "pt"})
    return folder


def resolve_identity_dir(models_dir: str | os.PathLike | None) -> Path:
    """The folder holding ``config.json``: ``models_dir`` itself, its ``identity/`` subfolder, or the
    bundle's ``identity/`` when ``models_dir`` is None."""
    from ..errors import FaceError
    from .bundle import IDENTITY, bundle_path

    if models_dir is None:
        return bundle_path(IDENTITY)
    base = Path(models_dir).expanduser()
    for folder in (base, base / IDENTITY):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise FaceError(
        f"{base}: no world face models here (expected {CONFIG_NAME}, {DETECTOR_WEIGHTS} and "
        f"{RECOGNISER_WEIGHTS}, or an {IDENTITY}/ folder holding them)."
    )


def load_familiarity(folder: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The familiarity statistics saved in ``folder``, or ``None`` (models trained before they existed)."""
    from safetensors.torch import load_file

    path = Path(folder) / FAMILIARITY_WEIGHTS
    return load_file(str(path)) if path.is_file() else None


def load_identity_models(
    folder: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[WorldDetector, WorldRecogniser, dict[str, Any]]:
    """The detector, recogniser (eval mode, on ``device``) and config saved in ``folder``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = {**DEFAULT_CONFIG, **json.loads((folder / CONFIG_NAME).read_text())}
    detector, recogniser = build_models(config)
    detector.load_state_dict(load_file(str(folder / DETECTOR_WEIGHTS)))
    recogniser.load_state_dict(load_file(str(folder / RECOGNISER_WEIGHTS)))
    fast = torch.channels_last
    return (
        detector.to(device, memory_format=fast).eval(),
        recogniser.to(device, memory_format=fast).eval(),
        config,
    )


def _uint8_batch(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    return images if isinstance(images, torch.Tensor) else torch.tensor(np.asarray(images, dtype=np.uint8))


class WorldFaceAnalyser(FaceAnalyser):
    """Face analysis of world characters (backend ``"world"``): one character per image at most.

    Embeddings are labelled ArcFace because they play ArcFace's part for the world's FaceID/InstantID
    adapters; they are ArcFace-compatible only inside the world. The analyser knows nothing of real faces.
    """

    name = NAME
    max_faces = 1  # the detector reads the whole image for one character
    embedding_kind = ARCFACE

    def __init__(
        self,
        models_dir: str | os.PathLike | None = None,
        *,
        device: str | torch.device = "cpu",
        threshold: float | None = None,
    ):
        self.folder = resolve_identity_dir(models_dir)
        self.device = torch.device(device)
        self.detector, self.recogniser, self.config = load_identity_models(self.folder, self.device)
        self.threshold = float(self.config["presence_threshold"] if threshold is None else threshold)
        self.familiarity = load_familiarity(self.folder)
        self.familiarity_threshold = float(self.config["familiarity_threshold"])
        self.size = int(self.config["detect_size"])
        self.template = torch.from_numpy(crop_template(self.config))

    def describe(self) -> str:
        return (
            f"world: character detector + recogniser from {self.folder} (512-d embeddings, "
            "ArcFace-compatible only inside the offline world)"
        )

    def search_limits(self, width: int, height: int) -> str:
        smallest = 12 * max(width, height) / self.size
        return (
            f"The world detector searched the whole {width}x{height} image (resized to {self.size}x{self.size}) "
            f"for one world character with a body at least ~{smallest:.0f} px wide, in an image that looks "
            "like the offline world's renders; it knows nothing of real faces or photos"
        )

    def accepted(self, found: dict[str, np.ndarray]) -> np.ndarray:
        """Which of :meth:`detect_batch`'s detections count as faces: presence at least the threshold and,
        where the models carry familiarity statistics, an image that looks like the world's renders."""
        keep = found["score"] >= self.threshold
        if self.familiarity is not None:
            keep &= found["familiarity"] <= self.familiarity_threshold
        return keep

    @torch.no_grad()
    def detect_batch(self, images: np.ndarray | torch.Tensor, chunk: int = 512) -> dict[str, np.ndarray]:
        """Detections for uint8 ``[B, 64, 64, 3]`` images: ``kps`` ``[B, 5, 2]``, ``bbox`` ``[B, 4]``,
        ``score`` ``[B]`` (presence probability) in 64x64 pixel coordinates, and ``familiarity`` ``[B]``
        (distance from the world renders' features, 0 without statistics; see :meth:`accepted`)."""
        images = _uint8_batch(images)
        parts = []
        for start in range(0, len(images), chunk):
            x = to_unit_range(images[start : start + chunk].to(self.device))
            kps, box, logit, features = self.detector.run(x.contiguous(memory_format=torch.channels_last))
            if self.familiarity is None:
                distance = torch.zeros(len(x))
            else:
                distance = familiarity_distance(features, self.familiarity)
            parts.append((kps.cpu(), box.cpu(), logit.sigmoid().cpu(), distance.float().cpu()))
        kps, box, score, distance = (torch.cat(column).numpy() for column in zip(*parts, strict=True))
        return {"kps": kps, "bbox": box, "score": score, "familiarity": distance}

    @torch.no_grad()
    def embed_batch(
        self, images: np.ndarray | torch.Tensor, kps: np.ndarray | torch.Tensor, chunk: int = 512
    ) -> np.ndarray:
        """Raw embeddings ``[B, 512]`` of uint8 ``[B, 64, 64, 3]`` images aligned on keypoints ``[B, 5, 2]``."""
        images = _uint8_batch(images)
        points = torch.as_tensor(np.asarray(kps, dtype=np.float32))
        template = self.template.to(self.device)
        out = []
        for start in range(0, len(images), chunk):
            x = to_unit_range(images[start : start + chunk].to(self.device))
            matrices = similarity_matrices(points[start : start + chunk].to(self.device), template)
            crops = warp_crops(x, matrices, self.config["crop_width"], self.config["crop_height"])
            out.append(self.recogniser(crops.contiguous(memory_format=torch.channels_last)).float().cpu())
        return torch.cat(out).numpy()

    def detect(self, image: ImageInput, *, embed: bool = True) -> list[Face]:
        picture = load_image(image).convert("RGB")
        width, height = picture.size
        if picture.size != (self.size, self.size):
            picture = picture.resize((self.size, self.size), Image.LANCZOS)
        pixels = np.asarray(picture, dtype=np.uint8)[None]
        found = self.detect_batch(pixels)
        score = float(found["score"][0])
        if not self.accepted(found)[0]:
            return []
        kps = found["kps"][0]
        embedding = self.embed_batch(pixels, kps[None])[0] if embed else None
        scale = np.array([width / self.size, height / self.size], dtype=np.float32)
        return [
            Face(
                bbox=(found["bbox"][0].reshape(2, 2) * scale).reshape(4),  # box edges scale directly
                score=score,
                kps=(kps + 0.5) * scale - 0.5,  # keypoints are pixel centres
                embedding=embedding,
                embedding_kind=ARCFACE if embed else None,
                embedding_model=EMBEDDING_MODEL if embed else None,
                backend=NAME,
            )
        ]
