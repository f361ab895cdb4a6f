"""The judge: attribute classifiers that score generated images, and the scores built on them.

Identity transfer in the world is measured the way a person would check it: look at the output and read
off who it is (every identity attribute, coarse and fine) and what scene it shows (background, position,
size, pose). :class:`JudgeNet` is a small CNN with one classification head per attribute, trained on
renders' exact ground truth. It only scores outputs; no model is ever trained against it, so a generator
cannot learn to fool it.

Generated images are softer and noisier than renders, so training adds slight blur, noise and small
colour jitter (kept small: ``colour`` and ``tone`` are themselves attributes). Reference portraits of every
identity are added to the training set with their scene heads masked, so the judge also reads the
``copy`` baseline (the reference itself) correctly.

Scores (:func:`identity_accuracy`, :func:`prompt_accuracy`): the fraction of the reference's attributes
(all / coarse / fine) and of the requested scene attributes the judge reads on the output.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import IdcraftError
from .arrays import ATTRIBUTE_NAMES, SCENE_NAMES, WorldArrays, attribute_labels, reference_images
from .identity import ATTRIBUTES, COARSE_ATTRIBUTES, FINE_ATTRIBUTES, NUM_IDENTITIES, identity_from_id
from .scene import SCENE_ATTRIBUTES
from .trainers.steps import LOG_EVERY, FastLoop, shuffled_batches, use_fast_path

#: Every head the judge has, in order: identity attributes then scene attributes.
HEADS: tuple[str, ...] = ATTRIBUTE_NAMES + SCENE_NAMES
HEAD_SIZES: dict[str, int] = {
    **{k: len(v) for k, v in ATTRIBUTES.items()},
    **{k: len(v) for k, v in SCENE_ATTRIBUTES.items()},
}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

#: Default model size and augmentation strengths (``config=`` overrides any of them).
JUDGE_CONFIG: dict = {
    "stem": 16,  # the full-resolution stage: 64 -> 32
    "channels": [48, 96, 128],  # one stage per halving: 32 -> 16 -> 8 -> 4
    "depths": [1, 1, 2, 2],  # 3x3 convs in the stem and in each stage
    "hidden": 256,
    "dropout": 0.0,
    "blur": 1.0,  # mix weight of a 3x3 Gaussian blur, drawn uniformly in [0, blur] per image
    "noise": 0.04,  # std of Gaussian noise (images in [0, 1]), drawn uniformly in [0, noise] per image
    "brightness": 0.03,  # offset, uniform in [-b, b]
    "contrast": 0.06,  # factor, uniform in [1 - c, 1 + c]
    "channel_gain": 0.03,  # per-channel factor, uniform in [1 - g, 1 + g]
    "downsample": 0.25,  # probability of a 2x down-and-up resample (the blur of a coarse decoder)
    "label_smoothing": 0.05,
}


class JudgeNet(nn.Module):
    """Who and where, read by two branches over one conv trunk.

    Trunk: a full-resolution 3x3 stem (eyes are 2-3 px on a small character; max-pooling keeps such
    details), then 3x3 conv + BatchNorm + SiLU stages, each halving the resolution, down to an 8x8 map.
    Identity heads read its global max and mean (who it is does not depend on where it stands, so one
    detector serves every position); scene heads read the map pooled to 4x4 and flattened (position,
    size and pose are about where).
    """

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.config = {**JUDGE_CONFIG, **(config or {})}
        layers: list[nn.Module] = []
        width = 3
        widths = [self.config["stem"], *self.config["channels"]]
        depths = self.config["depths"]
        for k, (out, depth) in enumerate(zip(widths, depths, strict=True)):
            for _ in range(depth):
                layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.SiLU()]
                width = out
            if k < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = 64 // 2 ** len(self.config["channels"])  # the map's side before the scene branch's pooling
        hidden, dropout = self.config["hidden"], self.config["dropout"]
        self.who = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(2 * width, hidden), nn.SiLU(), nn.Dropout(dropout)
        )
        self.where = nn.Sequential(
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(width * (side // 2) ** 2, hidden),
            nn.SiLU(),
            nn.Dropout(dropout),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, HEAD_SIZES[name]) for name in HEADS})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixels``: float ``[N, 3, 64, 64]`` in ``[0, 1]`` -> logits per head."""
        pixels = (pixels * 2 - 1).contiguous(memory_format=torch.channels_last)  # faster convs on CPU
        grid = self.features(pixels)
        who = self.who(torch.cat([grid.amax(dim=(2, 3)), grid.mean(dim=(2, 3))], dim=1))
        where = self.where(grid)
        return {name: self.heads[name](who if name in ATTRIBUTES else where) for name in HEADS}


def to_pixels(images: np.ndarray | Sequence, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``[N, 64, 64, 3]`` (or a list of PIL images / arrays) -> float ``[N, 3, 64, 64]`` in [0, 1]."""
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    if images.ndim != 4 or images.shape[1:] != (64, 64, 3):
        raise IdcraftError(f"the judge reads 64x64 RGB images, got an array of shape {images.shape}.")
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0


def augment(pixels: torch.Tensor, config: dict, generator: torch.Generator) -> torch.Tensor:
    """Slight blur, resampling, noise and colour jitter, drawn per image from ``generator`` where it lives
    (a CPU generator, as the CPU path uses, draws the same on every device; the fast path draws on the
    accelerator)."""
    n = pixels.shape[0]
    at = generator.device

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return (torch.rand(n, *shape, generator=generator, device=at) * (hi - lo) + lo).to(pixels.device)

    kernel = _blur_kernel(pixels.device)
    blurred = F.conv2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    weight = uniform(0, config["blur"], 1, 1, 1)
    out = pixels + weight * (blurred - pixels)
    resample = (uniform(0, 1, 1, 1, 1) < config["downsample"]).float()
    small = F.interpolate(F.avg_pool2d(out, 2), scale_factor=2, mode="bilinear", align_corners=False)
    out = out + resample * (small - out)
    c, b, g = config["contrast"], config["brightness"], config["channel_gain"]
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * uniform(1 - c, 1 + c, 1, 1, 1) + mean + uniform(-b, b, 1, 1, 1)
    out = out * uniform(1 - g, 1 + g, 3, 1, 1)
    noise = torch.randn(pixels.shape, generator=generator, device=at).to(pixels.device)
    out = out + noise * uniform(0, config["noise"], 1, 1, 1)
    return out.clamp(0, 1)


@lru_cache(maxsize=8)
def _blur_kernel(device: torch.device) -> torch.Tensor:
    """:func:`augment`'s 3x3 Gaussian, made once per device (a copy from the host each step would make a
    GPU step wait for the host)."""
    kernel = torch.tensor([1.0, 2.0, 1.0], device=device)
    return (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)


def _labels(arrays: WorldArrays) -> np.ndarray:
    """``[N, len(HEADS)]`` targets: identity attributes then scene attributes."""
    return np.concatenate([arrays.attributes, arrays.scene], axis=1).astype(np.int64)


def _reference_set(ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Reference portraits of ``ids`` with identity labels; scene labels -100 (ignored: the studio
    backdrop is no captioned scene)."""
    images = reference_images(ids)
    labels = np.full((len(ids), len(HEADS)), -100, dtype=np.int64)
    labels[:, : len(ATTRIBUTE_NAMES)] = [attribute_labels(identity_from_id(i).attributes()) for i in ids]
    return images, labels


def _losses(logits: dict[str, torch.Tensor], labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    return torch.stack(
        [
            F.cross_entropy(logits[name], labels[:, k], ignore_index=-100, label_smoothing=smoothing)
            for k, name in enumerate(HEADS)
            if (labels[:, k] >= 0).any()
        ]
    ).mean()


def _losses_on_device(
    logits: dict[str, torch.Tensor], labels: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """:func:`_losses` without a host round trip: heads with no labelled sample in the batch weigh 0."""
    per_head, present = [], []
    for k, name in enumerate(HEADS):
        valid = (labels[:, k] >= 0).sum()
        summed = F.cross_entropy(
            logits[name].float(), labels[:, k], ignore_index=-100, label_smoothing=smoothing, reduction="sum"
        )
        per_head.append(summed / valid.clamp(min=1))
        present.append((valid > 0).float())
    weights = torch.stack(present)
    return (torch.stack(per_head) * weights).sum() / weights.sum().clamp(min=1)


def train_judge(
    arrays: WorldArrays,
    output_dir: str | os.PathLike,
    *,
    held_out: WorldArrays | None = None,
    references: bool = True,
    steps: int = 3000,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    config: dict | None = None,
    progress: bool = True,
    fast: bool | None = None,
    max_seconds: float | None = None,
    log_every: int | None = None,
) -> dict:
    """Train the judge on ``arrays`` (renders; any identities: it is a judge, not a generator), save it to
    ``output_dir`` and return measurements: final loss, seconds, and the accuracy per head on
    ``held_out`` (default: the last tenth of ``arrays``, not trained on).

    ``references``: also train the identity heads on every identity's reference portrait.

    ``fast`` (default: on a CUDA device) runs the step loop of :func:`_train_judge_fast` (bfloat16
    autocast, batches and augmentation drawn on the device, fused AdamW, no host synchronisation per
    step, ``max_seconds`` a time cap); the CPU path is unchanged.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    if held_out is None:
        cut = max(1, len(arrays) // 10)
        arrays, held_out = (
            arrays.subset(slice(0, len(arrays) - cut)),
            arrays.subset(slice(len(arrays) - cut, None)),
        )
    images, labels = arrays.images, _labels(arrays)
    if references:
        ref_images, ref_labels = _reference_set(range(NUM_IDENTITIES))
        images, labels = np.concatenate([images, ref_images]), np.concatenate([labels, ref_labels])

    torch.manual_seed(seed)
    model = JudgeNet(config).to(dev, memory_format=torch.channels_last).train()
    cfg = model.config
    all_images = torch.from_numpy(np.ascontiguousarray(images)).to(dev)  # uint8: 12 KB an image
    all_labels = torch.from_numpy(labels).to(dev)
    warmup = max(1, steps // 20)
    fast_measurements: dict = {}
    if use_fast_path(dev, fast):
        loop = FastLoop(
            dev,
            steps,
            seed=seed,
            desc="judge",
            batch_size=batch_size,
            log_every=log_every or LOG_EVERY,
            max_seconds=max_seconds,
            progress=progress,
        )
        loss_avg = _train_judge_fast(model, all_images, all_labels, cfg, loop, learning_rate, warmup)
        fast_measurements = loop.measurements()
        steps_run = fast_measurements["steps_done"]
    else:
        loss_avg = _train_judge_cpu(
            model, all_images, all_labels, cfg, dev, steps, batch_size, learning_rate, warmup, seed, progress
        )
        steps_run = steps
    train_seconds = time.perf_counter() - start

    judge = Judge(model.eval(), cfg)
    accuracy = judge.accuracy(held_out)
    judge.metrics = {
        "final_loss": round(float(loss_avg or 0.0), 4),
        "held_out_accuracy": {k: round(v, 4) for k, v in accuracy.items()},
        "held_out_mean": {
            group: round(float(np.mean([accuracy[k] for k in names])), 4)
            for group, names in (
                ("coarse", COARSE_ATTRIBUTES),
                ("fine", FINE_ATTRIBUTES),
                ("scene", SCENE_NAMES),
            )
        },
        "held_out_samples": len(held_out),
        "train_samples": len(images),
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "seconds": round(train_seconds, 1),
        **({**fast_measurements, "steps_done": steps_run} if fast_measurements else {}),
    }
    judge.save(output_dir)
    return dict(judge.metrics)


def _train_judge_cpu(
    model, all_images, all_labels, cfg, dev, steps, batch_size, learning_rate, warmup, seed, progress
):
    """The judge's step loop as it has always run (the CPU path); returns the smoothed final loss."""
    from tqdm.auto import tqdm

    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    generator = torch.Generator().manual_seed(seed)
    batches = shuffled_batches(len(all_images), batch_size, generator)
    loss_avg = None
    bar = tqdm(range(steps), desc="judge", disable=not progress)
    for _ in bar:
        index = next(batches).to(dev)
        pixels = augment(all_images[index].permute(0, 3, 1, 2).float() / 255.0, cfg, generator)
        loss = _losses(model(pixels), all_labels[index], cfg["label_smoothing"])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_avg:.3f}")
    return loss_avg


def _train_judge_fast(model, all_images, all_labels, cfg, loop: FastLoop, learning_rate, warmup) -> float:
    """The judge's step loop on an accelerator (:class:`~.trainers.steps.FastLoop`); returns the loss
    averaged over the last ``log_every`` steps (the CPU path's smoothed loss, near enough)."""
    optimiser = loop.adamw(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = loop.schedule(optimiser, warmup)
    batches = loop.batches(len(all_images))
    loop.start()
    for step in range(loop.steps):
        index = next(batches)
        pixels = augment(all_images[index].permute(0, 3, 1, 2).float() / 255.0, cfg, loop.generator)
        with loop.autocast():
            logits = model(pixels)
        loss = _losses_on_device(logits, all_labels[index], cfg["label_smoothing"])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        loop.record(step, loss)
        if loop.out_of_time():
            break
    losses = loop.finish()
    tail = losses[-loop.log_every :]
    return float(np.mean(tail)) if tail else 0.0


class Judge:
    """A trained :class:`JudgeNet` with its config and the measurements recorded when it was trained."""

    def __init__(self, model: JudgeNet, config: dict | None = None, metrics: dict | None = None):
        self.model = model.eval()
        self.config = config or model.config
        self.metrics = metrics or {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def save(self, directory: str | os.PathLike) -> Path:
        from ..outputs import save_safetensors

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "model": self.config,
            "heads": {name: list((ATTRIBUTES | SCENE_ATTRIBUTES)[name]) for name in HEADS},
            "metrics": self.metrics,
        }
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_safetensors(state, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> Judge:
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise IdcraftError(f"{directory}: no judge here (expected {CONFIG_FILE} and {WEIGHTS_FILE}).")
        meta = json.loads((directory / CONFIG_FILE).read_text())
        expected = {name: list((ATTRIBUTES | SCENE_ATTRIBUTES)[name]) for name in HEADS}
        if meta.get("heads") != expected:
            raise IdcraftError(
                f"{directory}: this judge was trained on other attribute values than this version of the "
                "world has; retrain it (scripts/build_world.py)."
            )
        model = JudgeNet(meta["model"])
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        return cls(model.to(device), meta["model"], meta.get("metrics", {}))

    @torch.no_grad()
    def logits(self, images: np.ndarray | Sequence, batch_size: int = 256) -> dict[str, torch.Tensor]:
        chunks: dict[str, list[torch.Tensor]] = {name: [] for name in HEADS}
        for lo in range(0, len(images), batch_size):
            out = self.model(to_pixels(images[lo : lo + batch_size], self.device))
            for name in HEADS:
                chunks[name].append(out[name].float().cpu())
        return {name: torch.cat(parts) for name, parts in chunks.items()}

    def predict(self, images: np.ndarray | Sequence, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Value index per head for each image (uint8 ``[N, 64, 64, 3]`` or a list of PIL images)."""
        if len(images) == 0:
            return {name: np.zeros(0, dtype=np.int64) for name in HEADS}
        return {k: v.argmax(1).numpy() for k, v in self.logits(images, batch_size).items()}

    def accuracy(self, arrays: WorldArrays) -> dict[str, float]:
        """Fraction of ``arrays`` on which each head reads the ground truth."""
        predicted = self.predict(arrays.images)
        labels = _labels(arrays)
        return {name: float((predicted[name] == labels[:, k]).mean()) for k, name in enumerate(HEADS)}


# ---------------------------------------------------------------------------- scores
def _matches(predicted: dict[str, np.ndarray], labels: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """``[N, len(names)]`` booleans: head ``names[j]`` read ``labels[:, j]`` on image ``i``."""
    labels = np.asarray(labels).reshape(len(labels), len(names))
    return np.stack([np.asarray(predicted[name]) == labels[:, j] for j, name in enumerate(names)], axis=1)


def identity_accuracy(predicted: dict[str, np.ndarray], reference_attributes: np.ndarray) -> dict[str, float]:
    """How much of the reference's identity the outputs show: the fraction of its attributes the judge
    reads on them, over ``all`` attributes, the ``coarse`` ones (also in the caption) and the ``fine`` ones
    (only in the reference image), averaged over images. ``reference_attributes``: ``[N, len(ATTRIBUTES)]``
    value indices (:func:`idcraft.world.arrays.attribute_labels` of each output's reference)."""
    hits = _matches(predicted, reference_attributes, ATTRIBUTE_NAMES)
    coarse = [ATTRIBUTE_NAMES.index(k) for k in COARSE_ATTRIBUTES]
    fine = [ATTRIBUTE_NAMES.index(k) for k in FINE_ATTRIBUTES]
    return {
        "all": float(hits.mean()),
        "coarse": float(hits[:, coarse].mean()),
        "fine": float(hits[:, fine].mean()),
    }


def prompt_accuracy(predicted: dict[str, np.ndarray], scene_labels: np.ndarray) -> float:
    """How well the outputs follow the prompt: the fraction of the requested scene attributes
    (background, position, size, pose; ``[N, 4]`` value indices) the judge reads on them."""
    return float(_matches(predicted, scene_labels, SCENE_NAMES).mean())


def per_attribute_accuracy(
    predicted: dict[str, np.ndarray], reference_attributes: np.ndarray, scene_labels: np.ndarray
) -> dict[str, float]:
    """Hit rate of every head separately (identity heads against the reference, scene heads against the
    request)."""
    ident = _matches(predicted, reference_attributes, ATTRIBUTE_NAMES).mean(0)
    scene = _matches(predicted, scene_labels, SCENE_NAMES).mean(0)
    return {name: float(v) for name, v in zip(HEADS, [*ident, *scene], strict=True)}
