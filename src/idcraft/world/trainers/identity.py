"""The world's face-analysis role: train the character detector and the ArcFace-style recogniser.

Real FaceID and InstantID read an insightface pack: a detector giving 5 keypoints, then ArcFace on the
face aligned to a template. The world needs the same pair for its characters
(:mod:`idcraft.world.face_backend` runs them):

* the **detector** learns keypoints, the face box and presence from renders (exact ground truth) and
  from backdrops with no character (:func:`~idcraft.world.arrays.empty_scenes`), with random zoom,
  rotation, shift, blur and noise so it also finds characters in references and generated images;
* the **recogniser** learns identity with ArcFace's additive angular margin loss on the training ids only
  (held-out ids are refused), on crops aligned from ground-truth keypoints plus jitter of the size of the
  detector's error, so at inference the detector's keypoints align crops the way training did.

Identification is then measured on the held-out ids, which no model has seen: scene renders against
each id's reference portrait, once with ground-truth keypoints and once through the saved analyser
(detector -> align -> recogniser).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..arrays import EVAL_SEED_OFFSET, WorldArrays, empty_scenes, held_out_arrays
from ..face_backend import (
    DEFAULT_CONFIG as MODEL_CONFIG,
)
from ..face_backend import (
    FAMILIARITY_FLOOR,
    WorldDetector,
    WorldFaceAnalyser,
    build_models,
    crop_template,
    familiarity_distance,
    familiarity_statistics,
    save_identity_models,
    similarity_matrices,
    to_unit_range,
    warp_crops,
)
from ..identity import held_out_ids, resolve_identity
from ..render import render_reference
from .steps import LOG_EVERY, FastLoop, use_fast_path, warmup_cosine

#: Model sizes (:data:`idcraft.world.face_backend.DEFAULT_CONFIG`) and run settings; ``config=`` overrides.
DEFAULT_CONFIG: dict[str, Any] = {
    **MODEL_CONFIG,
    "arcface_scale": 30.0,
    "arcface_margin": 0.4,
    "margin_warmup": 0.2,  # fraction of the steps over which the margin grows from 0 (ArcFace from scratch)
    "kps_jitter": 1.5,  # max std (px) of the noise added to ground-truth keypoints before alignment
    "detector_steps": None,  # None: as many as the recogniser
    "detector_learning_rate": None,  # None: learning_rate
    "negatives": 0.2,  # share of each detector batch that has no character
    "augment": 0.7,  # share of detector samples zoomed / rotated / shifted
    "weight_decay": 5e-4,
    "eval_samples": 1024,
    "eval_negatives": 128,
}


def reference_arrays(ids: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference portraits of ``ids`` with their ground truth: images, keypoints, face boxes."""
    samples = [render_reference(resolve_identity(int(i)), 64) for i in ids]
    images = np.stack([np.asarray(s.image, dtype=np.uint8) for s in samples])
    kps = np.stack([np.asarray(s.kps, dtype=np.float32) for s in samples])
    boxes = np.asarray([s.face_bbox for s in samples], dtype=np.float32)
    return images, kps, boxes


def negative_images(num: int, seed: int) -> np.ndarray:
    """Images with no character: the world's backdrops (studio included) as scenes show them."""
    from PIL import Image

    from ..backgrounds import backdrop
    from ..render import SUPERSAMPLE
    from ..scene import NUM_VARIANTS, STUDIO

    studio = [
        np.asarray(backdrop(STUDIO, v, SUPERSAMPLE * 64).convert("RGB").resize((64, 64), Image.LANCZOS))
        for v in range(NUM_VARIANTS)
    ]
    return np.concatenate([empty_scenes(num, seed=seed), np.stack(studio).astype(np.uint8)])


class ArcFaceHead(nn.Module):
    """ArcFace's additive angular margin softmax: logit ``s * cos(theta + m)`` for the true class, ``s *
    cos(theta)`` for the others, with the usual fallback where ``theta + m`` would pass pi."""

    def __init__(self, dim: int, classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) * 0.01)
        self.scale = scale

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, margin: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = F.normalize(embeddings) @ F.normalize(self.weight).T
        target = cos.gather(1, labels[:, None]).clamp(-1 + 1e-7, 1 - 1e-7)
        with_margin = torch.cos(torch.acos(target) + margin)
        fallback = target - math.sin(math.pi - margin) * margin
        target = torch.where(target > math.cos(math.pi - margin), with_margin, fallback)
        logits = cos.scatter(1, labels[:, None], target) * self.scale
        return F.cross_entropy(logits, labels), (cos.argmax(1) == labels).float().mean()


def _random_similarity(n: int, generator: torch.Generator, share: float) -> torch.Tensor:
    """``[n, 2, 3]`` random zoom (0.8-1.3), rotation (+-10 deg) and shift (+-4 px) about the image centre,
    for a ``share`` of the rows; the rest stay the identity."""
    scale = torch.empty(n).uniform_(0.8, 1.3, generator=generator)
    angle = torch.empty(n).uniform_(-10, 10, generator=generator) * math.pi / 180
    shift = torch.empty(n, 2).uniform_(-4, 4, generator=generator)
    keep = torch.rand(n, generator=generator) >= share
    scale[keep], angle[keep], shift[keep] = 1.0, 0.0, 0.0
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)
    centre = torch.full((n, 2), 31.5)
    offset = centre + shift - torch.einsum("bij,bj->bi", rot, centre)
    return torch.cat([rot, offset[..., None]], 2)


def _transform(points: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bij,bkj->bki", matrices[:, :, :2], points) + matrices[:, None, :, 2]


def _degrade(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild blur on a third of the images and Gaussian noise on all (generated images are softer)."""
    n = x.shape[0]
    blur = (torch.rand(n, generator=generator) < 0.33).to(x.device)
    soft = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    x = torch.where(blur[:, None, None, None], 0.5 * x + 0.5 * soft, x)
    sigma = torch.rand(n, 1, 1, 1, generator=generator).to(x.device) * 0.06
    return x + sigma * torch.randn(x.shape, generator=generator).to(x.device)


def _detector_batch(
    images: torch.Tensor,
    kps: torch.Tensor,
    boxes: torch.Tensor,
    negatives: torch.Tensor,
    cfg: dict[str, Any],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augmented detector inputs and targets: positives then negatives (some as flat colour fields)."""
    b = images.shape[0]
    matrices = _random_similarity(b, generator, cfg["augment"])
    new_kps = _transform(kps, matrices)
    corners = torch.stack(
        [boxes[:, [0, 1]], boxes[:, [2, 1]], boxes[:, [0, 3]], boxes[:, [2, 3]]], 1
    )  # edges -> centres -> transform -> edges
    moved = _transform(corners - 0.5, matrices) + 0.5
    new_boxes = torch.cat([moved.amin(1), moved.amax(1)], 1).clamp(0, 64)
    outside = ((new_kps < 1) | (new_kps > 62)).flatten(1).any(1)
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    matrices[outside] = identity
    new_kps[outside], new_boxes[outside] = kps[outside], boxes[outside]
    x = to_unit_range(images)
    x = warp_crops(x, matrices.to(x.device), 64, 64, padding="border")
    m = negatives.shape[0]
    neg = warp_crops(
        to_unit_range(negatives),
        _random_similarity(m, generator, cfg["augment"]).to(x.device),
        64,
        64,
        padding="border",
    )
    flat = torch.rand(m, generator=generator) < 0.25
    colour = torch.empty(m, 3, 1, 1).uniform_(-1, 1, generator=generator).to(x.device)
    neg = torch.where(flat.to(x.device)[:, None, None, None], colour.expand_as(neg), neg)
    inputs = _degrade(torch.cat([x, neg]), generator).clamp(-1, 1)
    present = torch.cat([torch.ones(b), torch.zeros(m)]).to(x.device)
    return inputs, new_kps.to(x.device), new_boxes.to(x.device), present


# ---------------------------------------------------------------------------- the fast path's augmentation
def _random_similarity_on_device(n: int, generator: torch.Generator, share: float) -> torch.Tensor:
    """:func:`_random_similarity` drawn where ``generator`` lives, with no masked assignment."""
    at = generator.device
    scale = torch.empty(n, device=at).uniform_(0.8, 1.3, generator=generator)
    angle = torch.empty(n, device=at).uniform_(-10, 10, generator=generator) * math.pi / 180
    shift = torch.empty(n, 2, device=at).uniform_(-4, 4, generator=generator)
    keep = torch.rand(n, generator=generator, device=at) >= share
    scale = torch.where(keep, torch.ones_like(scale), scale)
    angle = torch.where(keep, torch.zeros_like(angle), angle)
    shift = torch.where(keep[:, None], torch.zeros_like(shift), shift)
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)
    centre = torch.full((n, 2), 31.5, device=at)
    offset = centre + shift - torch.einsum("bij,bj->bi", rot, centre)
    return torch.cat([rot, offset[..., None]], 2)


def _warp_on_device(images: torch.Tensor, matrices: torch.Tensor, width: int, height: int, padding: str):
    """:func:`~idcraft.world.face_backend.warp_crops` with the 2x3 affine inverted in closed form
    (``torch.linalg.inv`` checks for singular matrices on the host, a synchronisation per call)."""
    b, _, h, w = images.shape
    a, bb, c, d = matrices[:, 0, 0], matrices[:, 0, 1], matrices[:, 1, 0], matrices[:, 1, 1]
    det = a * d - bb * c
    inv_rot = torch.stack([torch.stack([d, -bb], -1), torch.stack([-c, a], -1)], 1) / det[:, None, None]
    inv_shift = -torch.einsum("bij,bj->bi", inv_rot, matrices[:, :, 2])
    inverse = torch.cat([inv_rot, inv_shift[..., None]], 2)  # crop -> image
    ys, xs = torch.meshgrid(
        torch.arange(height, device=images.device, dtype=torch.float32),
        torch.arange(width, device=images.device, dtype=torch.float32),
        indexing="ij",
    )
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1)
    source = torch.einsum("bij,yxj->byxi", inverse, points)
    grid = torch.stack([(source[..., 0] + 0.5) * (2.0 / w), (source[..., 1] + 0.5) * (2.0 / h)], -1) - 1.0
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _degrade_on_device(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """:func:`_degrade` drawn where ``generator`` lives."""
    n, at = x.shape[0], generator.device
    blur = torch.rand(n, generator=generator, device=at) < 0.33
    soft = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    x = torch.where(blur[:, None, None, None], 0.5 * x + 0.5 * soft, x)
    sigma = torch.rand(n, 1, 1, 1, generator=generator, device=at) * 0.06
    return x + sigma * torch.randn(x.shape, generator=generator, device=at)


def _detector_batch_on_device(images, kps, boxes, negatives, cfg: dict[str, Any], generator: torch.Generator):
    """:func:`_detector_batch` on the device: the same augmentation, drawn there, with ``torch.where``
    where the CPU path assigns through masks."""
    b, at = images.shape[0], generator.device
    matrices = _random_similarity_on_device(b, generator, cfg["augment"])
    new_kps = _transform(kps, matrices)
    corners = torch.stack([boxes[:, [0, 1]], boxes[:, [2, 1]], boxes[:, [0, 3]], boxes[:, [2, 3]]], 1)
    moved = _transform(corners - 0.5, matrices) + 0.5
    new_boxes = torch.cat([moved.amin(1), moved.amax(1)], 1).clamp(0, 64)
    outside = ((new_kps < 1) | (new_kps > 62)).flatten(1).any(1)
    identity = torch.eye(2, 3, device=at)  # made on the device: no copy from the host
    matrices = torch.where(outside[:, None, None], identity, matrices)
    new_kps = torch.where(outside[:, None, None], kps, new_kps)
    new_boxes = torch.where(outside[:, None], boxes, new_boxes)
    x = _warp_on_device(to_unit_range(images), matrices, 64, 64, "border")
    m = negatives.shape[0]
    neg_matrices = _random_similarity_on_device(m, generator, cfg["augment"])
    neg = _warp_on_device(to_unit_range(negatives), neg_matrices, 64, 64, "border")
    flat = torch.rand(m, generator=generator, device=at) < 0.25
    colour = torch.empty(m, 3, 1, 1, device=at).uniform_(-1, 1, generator=generator)
    neg = torch.where(flat[:, None, None, None], colour.expand_as(neg), neg)
    inputs = _degrade_on_device(torch.cat([x, neg]), generator).clamp(-1, 1)
    present = torch.cat([torch.ones(b, device=at), torch.zeros(m, device=at)])
    return inputs, new_kps, new_boxes, present


def _train_identity_fast(
    detector,
    recogniser,
    head,
    images,
    kps,
    boxes,
    labels,
    negatives,
    cfg: dict[str, Any],
    loop: FastLoop,
    *,
    steps: int,
    detector_steps: int,
    learning_rate: float,
    det_lr: float,
    warmup: int,
) -> dict[str, list[float]]:
    """:func:`train_identity`'s step loop on an accelerator (:class:`~.steps.FastLoop`): every series of
    the CPU path's history, kept on the device and read back once at the end."""
    dev, generator = loop.device, loop.generator
    channels_last = torch.channels_last
    rec_opt = loop.adamw(
        [*recogniser.parameters(), *head.parameters()], lr=learning_rate, weight_decay=cfg["weight_decay"]
    )
    det_opt = loop.adamw(detector.parameters(), lr=det_lr, weight_decay=cfg["weight_decay"])
    rec_sched = loop.schedule(rec_opt, warmup, steps)
    det_sched = loop.schedule(det_opt, warmup, detector_steps)
    template = torch.from_numpy(crop_template(cfg)).to(dev)
    images, kps, boxes = images.to(dev), kps.to(dev), boxes.to(dev)
    labels, negatives = labels.to(dev), negatives.to(dev)
    batch_size = loop.batch_size
    n_neg = max(1, round(batch_size * cfg["negatives"]))
    series = {
        name: torch.zeros(max(1, loop.steps), device=dev)
        for name in ("recogniser", "train_accuracy", "detector", "kps_px")
    }
    zero = torch.zeros((), device=dev)
    detector.train()
    recogniser.train()
    loop.start()
    for step in range(loop.steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator, device=dev)
        batch_images, batch_kps = images[index], kps[index]
        rec_loss, det_loss, kps_px = zero, zero, zero
        if step < steps:
            sigma = torch.rand(batch_size, 1, 1, generator=generator, device=dev) * cfg["kps_jitter"]
            noisy = batch_kps + sigma * torch.randn(batch_kps.shape, generator=generator, device=dev)
            crops = _warp_on_device(
                to_unit_range(batch_images),
                similarity_matrices(noisy, template),
                cfg["crop_width"],
                cfg["crop_height"],
                "zeros",
            )
            margin = cfg["arcface_margin"] * min(1.0, (step + 1) / max(1.0, cfg["margin_warmup"] * steps))
            with loop.autocast():
                embeddings = recogniser(crops.contiguous(memory_format=channels_last))
            rec_loss, accuracy = head(embeddings.float(), labels[index], margin)
            rec_opt.zero_grad(set_to_none=True)
            rec_loss.backward()
            rec_opt.step()
            rec_sched.step()
            series["recogniser"][step] = rec_loss.detach()
            series["train_accuracy"][step] = accuracy.detach()
        if step < detector_steps:
            neg = negatives[torch.randint(0, len(negatives), (n_neg,), generator=generator, device=dev)]
            inputs, target_kps, target_boxes, present = _detector_batch_on_device(
                batch_images, batch_kps, boxes[index], neg, cfg, generator
            )
            with loop.autocast():
                pred_kps, pred_boxes, logits = detector(inputs.contiguous(memory_format=channels_last))
            pred_kps, pred_boxes, logits = pred_kps.float(), pred_boxes.float(), logits.float()
            positive = slice(0, batch_size)
            kps_l1 = (pred_kps[positive] - target_kps).abs().mean()
            box_l1 = (pred_boxes[positive] - target_boxes).abs().mean()
            det_loss = kps_l1 + 0.5 * box_l1 + F.binary_cross_entropy_with_logits(logits, present)
            det_opt.zero_grad(set_to_none=True)
            det_loss.backward()
            det_opt.step()
            det_sched.step()
            with torch.no_grad():
                kps_px = (pred_kps[positive] - target_kps).norm(dim=-1).mean()
            series["detector"][step] = det_loss.detach()
            series["kps_px"][step] = kps_px
        loop.record(step, rec_loss if step < steps else det_loss, {"detector": det_loss, "kps_px": kps_px})
        if loop.out_of_time():
            break
    loop.finish()
    done = loop.steps_done
    return {
        "recogniser": series["recogniser"][: min(done, steps)].tolist(),
        "train_accuracy": series["train_accuracy"][: min(done, steps)].tolist(),
        "detector": series["detector"][: min(done, detector_steps)].tolist(),
        "kps_px": series["kps_px"][: min(done, detector_steps)].tolist(),
    }


def _top1(
    queries: np.ndarray, query_ids: np.ndarray, refs: np.ndarray, ref_ids: np.ndarray
) -> dict[str, float]:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    r = refs / np.linalg.norm(refs, axis=1, keepdims=True)
    sims = q @ r.T
    own = sims[np.arange(len(q)), np.searchsorted(ref_ids, query_ids)]
    impostor = np.where(ref_ids[None, :] == query_ids[:, None], -np.inf, sims).max(1)
    return {
        "top1": float(np.mean(ref_ids[sims.argmax(1)] == query_ids)),
        "mean_cosine_same": float(own.mean()),
        "mean_cosine_best_other": float(impostor.mean()),
    }


def evaluate_identity(
    analyser: WorldFaceAnalyser, eval_arrays: WorldArrays, negatives: np.ndarray
) -> dict[str, float]:
    """Detection and held-out identification of a saved analyser (see the module docstring)."""
    ids = np.union1d(held_out_ids(), eval_arrays.identity_ids)  # every held-out reference is a candidate
    ref_images, ref_kps, _ = reference_arrays(ids)
    out: dict[str, float] = {"identification_ids": len(ids), "identification_chance": 1.0 / len(ids)}
    gt = _top1(
        analyser.embed_batch(eval_arrays.images, eval_arrays.kps),
        eval_arrays.identity_ids,
        analyser.embed_batch(ref_images, ref_kps),
        ids,
    )
    out.update({f"gt_kps_{k}": v for k, v in gt.items()})
    found = analyser.detect_batch(eval_arrays.images)
    found_refs = analyser.detect_batch(ref_images)
    full = _top1(
        analyser.embed_batch(eval_arrays.images, found["kps"]),
        eval_arrays.identity_ids,
        analyser.embed_batch(ref_images, found_refs["kps"]),
        ids,
    )
    out.update({f"analyser_{k}": v for k, v in full.items()})
    error = np.linalg.norm(found["kps"] - eval_arrays.kps, axis=-1)
    box, truth = found["bbox"], eval_arrays.face_bbox
    inter = np.clip(
        np.minimum(box[:, 2:], truth[:, 2:]) - np.maximum(box[:, :2], truth[:, :2]), 0, None
    ).prod(1)
    union = (box[:, 2:] - box[:, :2]).clip(0).prod(1) + (truth[:, 2:] - truth[:, :2]).prod(1) - inter
    out.update(
        {
            "detector_kps_error_px": float(error.mean()),
            "detector_kps_error_px_p95": float(np.percentile(error.mean(1), 95)),
            "reference_kps_error_px": float(np.linalg.norm(found_refs["kps"] - ref_kps, axis=-1).mean()),
            "detector_box_iou": float((inter / np.maximum(union, 1e-6)).mean()),
            "detector_recall": float(np.mean(analyser.accepted(found))),
            "reference_recall": float(np.mean(analyser.accepted(found_refs))),
            "detector_false_positive_rate": float(
                np.mean(analyser.accepted(analyser.detect_batch(negatives)))
            ),
            "familiarity_max_render": float(max(found["familiarity"].max(), found_refs["familiarity"].max())),
        }
    )
    return out


#: Training images the familiarity statistics are fitted on, at most (each also once augmented).
FAMILIARITY_SAMPLES = 4096
#: Margin of the familiarity threshold over the largest distance of a held-out render.
FAMILIARITY_MARGIN = 1.15


@torch.no_grad()
def fit_familiarity(
    detector: WorldDetector,
    images: torch.Tensor | np.ndarray,
    generator: torch.Generator,
    augment: float = DEFAULT_CONFIG["augment"],
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Familiarity statistics (:func:`~idcraft.world.face_backend.familiarity_statistics`) of the trained
    ``detector``'s features over uint8 ``[N, 64, 64, 3]`` world renders: up to
    :data:`FAMILIARITY_SAMPLES` of them as they are and once more zoomed, rotated, shifted, blurred and
    noised as in detector training, so that softer or reframed world images still count as the world."""
    images = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    chosen = images[torch.randperm(len(images), generator=generator)[:FAMILIARITY_SAMPLES]]
    detector = detector.eval()
    features = []
    for start in range(0, len(chosen), 256):
        x = to_unit_range(chosen[start : start + 256].to(device))
        moved = warp_crops(x, _random_similarity(len(x), generator, augment).to(x.device), 64, 64, "border")
        for inputs in (x, _degrade(moved, generator).clamp(-1, 1)):
            features.append(
                detector.run(inputs.contiguous(memory_format=torch.channels_last))[3].double().cpu()
            )
    return familiarity_statistics(torch.cat(features))


@torch.no_grad()
def familiarity_threshold(
    detector: WorldDetector,
    statistics: dict[str, torch.Tensor],
    held_out: np.ndarray,
    device: str | torch.device = "cpu",
) -> float:
    """The threshold to store: :data:`FAMILIARITY_MARGIN` times the largest distance of the ``held_out``
    renders (uint8 ``[N, 64, 64, 3]``, identities never trained on), and never under
    :data:`~idcraft.world.face_backend.FAMILIARITY_FLOOR`."""
    detector = detector.eval()
    largest = 0.0
    for start in range(0, len(held_out), 256):
        x = to_unit_range(torch.as_tensor(np.asarray(held_out[start : start + 256])).to(device))
        features = detector.run(x.contiguous(memory_format=torch.channels_last))[3]
        largest = max(largest, float(familiarity_distance(features, statistics).max()))
    return round(max(FAMILIARITY_FLOOR, FAMILIARITY_MARGIN * largest), 4)


def add_familiarity(
    folder: str | os.PathLike,
    *,
    samples: int = FAMILIARITY_SAMPLES,
    eval_samples: int = DEFAULT_CONFIG["eval_samples"],
    seed: int = 0,
    workers: int | None = None,
) -> dict[str, float]:
    """Fit and write ``familiarity.safetensors`` and ``familiarity_threshold`` for identity models saved
    before they existed (``folder`` as :func:`~idcraft.world.face_backend.save_identity_models` wrote it),
    from ``samples`` fresh renders of the training ids plus their references, calibrated on
    ``eval_samples`` held-out renders and references -- what :func:`train_identity` now does itself.
    Returns the threshold and the largest held-out distance."""
    import json

    from ...outputs import save_safetensors
    from ..arrays import render_arrays
    from ..face_backend import CONFIG_NAME, FAMILIARITY_WEIGHTS, load_identity_models
    from ..identity import train_ids

    folder = Path(folder)
    detector, _, _ = load_identity_models(folder)
    ids = np.asarray(train_ids())
    images = np.concatenate(
        [render_arrays(samples, seed, ids=ids, workers=workers).images, reference_arrays(ids)[0]]
    )
    statistics = fit_familiarity(detector, images, torch.Generator().manual_seed(seed))
    held_out = held_out_arrays(eval_samples, seed)
    held_out_images = np.concatenate([held_out.images, reference_arrays(np.unique(held_out.identity_ids))[0]])
    threshold = familiarity_threshold(detector, statistics, held_out_images)
    save_safetensors(statistics, str(folder / FAMILIARITY_WEIGHTS), metadata={"format": "pt"})
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["familiarity_threshold"] = threshold
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return {"familiarity_threshold": threshold, "familiarity_samples": len(images), "seed": seed}


def train_identity(
    arrays: WorldArrays,
    output_dir: str | os.PathLike,
    *,
    steps: int = 3000,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    config: dict[str, Any] | None = None,
    progress: bool = True,
    eval_arrays: WorldArrays | None = None,
    fast: bool | None = None,
    max_seconds: float | None = None,
    log_every: int = LOG_EVERY,
) -> dict[str, Any]:
    """Train the detector and the recogniser on ``arrays`` (training ids only, plus their reference
    portraits) and save both to ``output_dir`` (:func:`~idcraft.world.face_backend.save_identity_models`).
    Returns losses, detector error and held-out identification (``eval_arrays``: default
    ``config["eval_samples"]`` renders of the held-out ids).

    ``fast`` (default: on a CUDA device) runs the step loop of :func:`_train_identity_fast` (data on the
    device, augmentation drawn there with no masked assignment or matrix inverse that waits on the host,
    bfloat16 autocast, fused AdamW, ``max_seconds`` a time cap); the CPU path is unchanged."""
    from tqdm.auto import tqdm

    cfg = {**DEFAULT_CONFIG, **(config or {})}
    held_out = set(held_out_ids())
    if any(int(i) in held_out for i in np.unique(arrays.identity_ids)):
        raise ValueError("train_identity: the training arrays contain held-out identities.")
    started = time.perf_counter()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    train_ids = np.unique(arrays.identity_ids)
    ref_images, ref_kps, ref_boxes = reference_arrays(train_ids)
    images = torch.from_numpy(np.concatenate([arrays.images, ref_images]))
    kps = torch.from_numpy(np.concatenate([arrays.kps, ref_kps]).astype(np.float32))
    boxes = torch.from_numpy(np.concatenate([arrays.face_bbox, ref_boxes]).astype(np.float32))
    labels = torch.from_numpy(np.searchsorted(train_ids, np.concatenate([arrays.identity_ids, train_ids])))
    negatives = torch.from_numpy(negative_images(64, seed))
    n = len(images)

    detector, recogniser = build_models(cfg)
    channels_last = torch.channels_last  # about a third faster for these small convolutions, CPU and GPU
    detector = detector.to(dev, memory_format=channels_last)
    recogniser = recogniser.to(dev, memory_format=channels_last)
    head = ArcFaceHead(cfg["embedding_dim"], len(train_ids), cfg["arcface_scale"]).to(dev)
    detector_steps = steps if cfg["detector_steps"] is None else int(cfg["detector_steps"])
    warmup = max(1, min(200, steps // 20))
    det_lr = learning_rate if cfg["detector_learning_rate"] is None else float(cfg["detector_learning_rate"])
    fast_measurements: dict[str, Any] = {}
    if use_fast_path(dev, fast):
        loop = FastLoop(
            dev,
            max(steps, detector_steps),
            seed=seed,
            desc="identity",
            batch_size=batch_size,
            log_every=log_every,
            max_seconds=max_seconds,
            progress=progress,
        )
        train_started, cpu_started = time.perf_counter(), time.process_time()
        history = _train_identity_fast(
            detector,
            recogniser,
            head,
            images,
            kps,
            boxes,
            labels,
            negatives,
            cfg,
            loop,
            steps=steps,
            detector_steps=detector_steps,
            learning_rate=learning_rate,
            det_lr=det_lr,
            warmup=warmup,
        )
        fast_measurements = loop.measurements()
    else:
        rec_opt = torch.optim.AdamW(
            [*recogniser.parameters(), *head.parameters()], lr=learning_rate, weight_decay=cfg["weight_decay"]
        )
        det_opt = torch.optim.AdamW(detector.parameters(), lr=det_lr, weight_decay=cfg["weight_decay"])
        rec_sched = warmup_cosine(rec_opt, steps, warmup)
        det_sched = warmup_cosine(det_opt, detector_steps, warmup)
        template = torch.from_numpy(crop_template(cfg)).to(dev)
        n_neg = max(1, round(batch_size * cfg["negatives"]))

        history: dict[str, list[float]] = {
            "recogniser": [],
            "train_accuracy": [],
            "detector": [],
            "kps_px": [],
        }
        detector.train()
        recogniser.train()
        bar = tqdm(range(max(steps, detector_steps)), desc="identity", disable=not progress)
        train_started, cpu_started = time.perf_counter(), time.process_time()
        for step in bar:
            index = torch.randint(0, n, (batch_size,), generator=generator)
            batch_images, batch_kps = images[index], kps[index]
            postfix = {}
            if step < steps:
                sigma = torch.rand(batch_size, 1, 1, generator=generator) * cfg["kps_jitter"]
                noisy = batch_kps + sigma * torch.randn(batch_kps.shape, generator=generator)
                crops = warp_crops(
                    to_unit_range(batch_images.to(dev)),
                    similarity_matrices(noisy.to(dev), template),
                    cfg["crop_width"],
                    cfg["crop_height"],
                )
                margin = cfg["arcface_margin"] * min(1.0, (step + 1) / max(1.0, cfg["margin_warmup"] * steps))
                embeddings = recogniser(crops.contiguous(memory_format=channels_last))
                loss, accuracy = head(embeddings, labels[index].to(dev), margin)
                rec_opt.zero_grad(set_to_none=True)
                loss.backward()
                rec_opt.step()
                rec_sched.step()
                history["recogniser"].append(float(loss.detach()))
                history["train_accuracy"].append(float(accuracy))
                postfix["arcface"] = f"{history['recogniser'][-1]:.2f}"
            if step < detector_steps:
                neg = negatives[torch.randint(0, len(negatives), (n_neg,), generator=generator)]
                inputs, target_kps, target_boxes, present = _detector_batch(
                    batch_images.to(dev), batch_kps, boxes[index], neg.to(dev), cfg, generator
                )
                pred_kps, pred_boxes, logits = detector(inputs.contiguous(memory_format=channels_last))
                positive = slice(0, batch_size)
                kps_l1 = (pred_kps[positive] - target_kps).abs().mean()
                box_l1 = (pred_boxes[positive] - target_boxes).abs().mean()
                loss = kps_l1 + 0.5 * box_l1 + F.binary_cross_entropy_with_logits(logits, present)
                det_opt.zero_grad(set_to_none=True)
                loss.backward()
                det_opt.step()
                det_sched.step()
                history["detector"].append(float(loss.detach()))
                with torch.no_grad():
                    history["kps_px"].append(float((pred_kps[positive] - target_kps).norm(dim=-1).mean()))
                postfix["kps_px"] = f"{history['kps_px'][-1]:.2f}"
            bar.set_postfix(postfix)
    train_seconds = time.perf_counter() - train_started
    train_cpu_seconds = time.process_time() - cpu_started  # all threads: what a busy machine hides

    if eval_arrays is None:
        eval_arrays = held_out_arrays(cfg["eval_samples"], seed)
    detector.eval()
    familiarity = fit_familiarity(detector, images, generator, cfg["augment"], dev)
    eval_refs = reference_arrays(np.unique(eval_arrays.identity_ids))[0]
    cfg["familiarity_threshold"] = familiarity_threshold(
        detector, familiarity, np.concatenate([eval_arrays.images, eval_refs]), dev
    )
    folder = save_identity_models(
        output_dir, detector.cpu().eval(), recogniser.cpu().eval(), cfg, familiarity
    )
    analyser = WorldFaceAnalyser(folder, device=dev)
    metrics = evaluate_identity(
        analyser, eval_arrays, empty_scenes(cfg["eval_negatives"], seed=seed + EVAL_SEED_OFFSET)
    )

    def _tail(values: list[float]) -> float | None:
        return float(np.mean(values[-max(1, min(50, len(values) // 10)) :])) if values else None

    def _head(values: list[float]) -> float | None:
        return float(np.mean(values[: max(1, min(20, len(values) // 10))])) if values else None

    size = sum(p.stat().st_size for p in Path(folder).iterdir())
    return {
        "output_dir": str(folder),
        "steps": steps,
        "detector_steps": detector_steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "train_samples": n,
        "train_identities": len(train_ids),
        "config": cfg,
        "bytes": size,
        "recogniser_initial_loss": _head(history["recogniser"]),
        "recogniser_final_loss": _tail(history["recogniser"]),
        "recogniser_train_accuracy": _tail(history["train_accuracy"]),
        "detector_initial_loss": _head(history["detector"]),
        "detector_final_loss": _tail(history["detector"]),
        "detector_initial_kps_px": _head(history["kps_px"]),
        "detector_final_train_kps_px": _tail(history["kps_px"]),
        "seconds_per_step": train_seconds
        / max(1, fast_measurements.get("steps_done", max(steps, detector_steps))),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started,
        **fast_measurements,
        **metrics,
    }
