"""The world's CLIP image encoder: a small ``CLIPModel`` trained contrastively on (render, caption) pairs.

This plays CLIP's role for the world's IP-Adapters. Like the real CLIP it never sees an identity label: it
learns what captions say (shape, colour, size, pose, position, background) and whatever else helps tell
one render from another in a batch. Measured on held-out renders it names colour, background and size
almost perfectly and shape, pose and position less well, and finds a character's own reference portrait
far less often than the recogniser does (``identification_top1``): IP-Adapter on top of it is expected
to transfer coarse looks better than fine identity -- the real method's known weakness, for the same
reason.

Only the vision tower is kept, saved as a ``CLIPVisionModelWithProjection`` folder with the default
``CLIPImageProcessor`` config beside it, so :func:`idcraft.models.load_image_encoder` and
:class:`idcraft.encoders.clip.ClipImageEncoder` read it like any CLIP checkpoint. Its input is therefore
224x224: a 64x64 render upsampled by the default processor (bicubic, CLIP mean/std). Training does the
same preprocessing in torch on whole batches (:func:`clip_pixels`, PIL's bicubic kernel as matrices, so
the encoder is trained on the very pixels it will be given).
"""

from __future__ import annotations

import math
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...outputs import follow_umask
from ..arrays import (
    ATTRIBUTE_NAMES,
    SCENE_NAMES,
    WorldArrays,
    held_out_arrays,
    reference_images,
)
from ..identity import held_out_ids
from .steps import LOG_EVERY, FastLoop, use_fast_path, warmup_cosine

#: The columns of :func:`content_labels`.
CONTENT_NAMES: tuple[str, ...] = (*ATTRIBUTE_NAMES[:2], *SCENE_NAMES)

#: Model and run settings; ``config=`` overrides any of them (CI trains a smaller model).
DEFAULT_CONFIG: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 28,  # 8x8 patches: one patch per 8x8 block of the 64x64 render
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "projection_dim": 128,
    "text_hidden_size": 128,
    "text_num_hidden_layers": 3,
    "text_num_attention_heads": 4,
    "text_intermediate_size": 256,
    "group_size": 8,  # batches of (colour, background) groups: hard negatives (see GroupedBatches)
    "max_shift": 2,  # random translation in render pixels (edge-replicated): the only augmentation
    "weight_decay": 0.05,
    "warmup_steps": 100,
    "eval_samples": 1024,  # held-out renders the retrieval accuracy is measured on
}

#: The default ``CLIPImageProcessor``'s normalisation (OpenAI CLIP's dataset statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _bicubic(x: float, a: float = -0.5) -> float:
    """PIL's bicubic kernel (``a = -0.5``; torch's ``bicubic`` uses -0.75, a visibly different image)."""
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@lru_cache(maxsize=8)
def pil_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """``[size_out, size_in]`` weights of PIL's 1-D bicubic resampling (its ``precompute_coeffs``)."""
    scale = size_in / size_out
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), size_in)
        row = np.array([_bicubic((x - centre + 0.5) / filter_scale) for x in range(lo, hi)])
        weights[i, lo:hi] = row / row.sum()
    return torch.tensor(weights, dtype=torch.float32)


def clip_pixels(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 ``[B, S, S, 3]`` renders -> ``[B, 3, size, size]`` exactly as the default
    ``CLIPImageProcessor`` prepares them (PIL bicubic resize, horizontal pass then vertical, each rounded to
    uint8 as PIL does; rescale; CLIP mean/std), within PIL's fixed-point rounding."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected square uint8 images [B, S, S, 3], got {tuple(images.shape)}")
    weights, mean, std = _pixel_constants(int(images.shape[1]), size, images.device)
    x = images.permute(0, 3, 1, 2).float()
    x = torch.matmul(x, weights.T).round_().clamp_(0, 255)  # rows: [B, 3, S, size]
    x = torch.matmul(weights, x).round_().clamp_(0, 255)  # columns: [B, 3, size, size]
    return x.sub_(mean).div_(std)


@lru_cache(maxsize=16)
def _pixel_constants(size_in: int, size_out: int, device: torch.device):
    """:func:`clip_pixels`' resize matrix and CLIP mean/std on ``device``, made once per device (a copy
    from the host each step would make a GPU step wait for the host)."""
    weights = pil_resize_matrix(size_in, size_out).to(device)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1) * 255.0
    return weights, mean, std


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each uint8 ``[B, S, S, 3]`` image translated by up to ``max_shift`` pixels (edges replicated)."""
    if max_shift <= 0:
        return images
    b, s = images.shape[0], images.shape[1]
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator, device=generator.device)
    shifts = shifts.to(images.device)
    base = torch.arange(s, device=images.device)
    rows = (base[None, :] - shifts[:, 1:2]).clamp(0, s - 1)  # [B, S]
    cols = (base[None, :] - shifts[:, 0:1]).clamp(0, s - 1)
    index = torch.arange(b, device=images.device)[:, None, None]
    return images[index, rows[:, :, None], cols[:, None, :]]


def build_clip_model(config: dict[str, Any], vocab_size: int, bos: int, eos: int):
    """A fresh ``CLIPModel`` of ``config``'s sizes (seeded by the caller)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(
        image_size=config["image_size"],
        patch_size=config["patch_size"],
        hidden_size=config["hidden_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        projection_dim=config["projection_dim"],
    )
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=config["text_hidden_size"],
        num_hidden_layers=config["text_num_hidden_layers"],
        num_attention_heads=config["text_num_attention_heads"],
        intermediate_size=config["text_intermediate_size"],
        projection_dim=config["projection_dim"],
        max_position_embeddings=77,
        bos_token_id=bos,
        eos_token_id=eos,  # pooled at the first end token (the pad token is the end token too)
        pad_token_id=eos,
    )
    full = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=config["projection_dim"]
    )
    return CLIPModel(full)


def vision_tower(model) -> Any:
    """The ``CLIPVisionModelWithProjection`` inside a ``CLIPModel`` (same weights, names match)."""
    from transformers import CLIPVisionModelWithProjection

    vision_config = model.config.vision_config
    vision_config.projection_dim = model.config.projection_dim
    tower = CLIPVisionModelWithProjection(vision_config)
    state = {
        k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))
    }
    tower.load_state_dict(state, strict=True)
    return tower.eval()


def tokenize(captions: np.ndarray, tokenizer) -> tuple[torch.Tensor, np.ndarray]:
    """Token ids of the distinct captions ``[U, L]`` (padded with the end token) and each row's index."""
    unique, inverse = np.unique(np.asarray(captions).astype(str), return_inverse=True)
    ids = tokenizer(unique.tolist(), padding=True, truncation=True, max_length=77).input_ids
    return torch.tensor(ids, dtype=torch.long), inverse.reshape(-1)


def content_labels(arrays: WorldArrays) -> np.ndarray:
    """What a caption says about each sample, ``[N, 6]``: shape, colour and the captioned scene attributes.
    Two samples with equal rows have captions that are paraphrases of each other."""
    return np.concatenate([arrays.attributes[:, :2], arrays.scene], axis=1)


def _features(output: Any) -> torch.Tensor:
    return F.normalize(getattr(output, "pooler_output", output).float(), dim=-1)


def contrastive_loss(
    model, pixels: torch.Tensor, input_ids: torch.Tensor, content: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE, with every pair whose captions say the same thing counted as a positive
    (a paraphrase is not a negative): the target of each row is uniform over its equal-content columns."""
    image = _features(model.get_image_features(pixel_values=pixels))
    text = _features(model.get_text_features(input_ids=input_ids))
    return _contrastive(image, text, model.logit_scale, content)


def _contrastive(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, content: torch.Tensor
) -> torch.Tensor:
    """:func:`contrastive_loss` from normalised float features ``[B, D]``."""
    logits = logit_scale.exp() * image @ text.T
    same = (content[:, None, :] == content[None, :, :]).all(-1).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-target * logits.log_softmax(1), 1).mean()
        + torch.sum(-target * logits.log_softmax(0), 0).mean()
    )


class GroupedBatches:
    """Batches made of groups of ``group`` samples sharing colour and background.

    In a random batch of 64 renders, colour, background and size already tell almost every sample apart,
    so the contrastive loss never asks for shape, pose or position; within a group only those differ.
    Groups are ``(colour, background)`` classes drawn at random, members drawn at random within them;
    ``group=1`` gives (nearly) plain random batches. In short CPU runs random batches learned faster
    (300 steps x 64, lr 5e-3: exact caption retrieval 13.9 % against 5.1 % with groups of 4, colour 92 %
    against 34 %, shape at chance in both); long runs have not compared the two."""

    def __init__(self, content: np.ndarray, batch_size: int, group: int, generator: torch.Generator):
        keys = content[:, 1] * 1000 + content[:, 2]  # colour, background
        self.members = [torch.from_numpy(np.flatnonzero(keys == k)) for k in np.unique(keys)]
        self.batch_size, self.group, self.generator = batch_size, max(1, group), generator

    def __call__(self) -> torch.Tensor:
        groups = -(-self.batch_size // self.group)
        chosen = torch.randint(0, len(self.members), (groups,), generator=self.generator)
        parts = []
        for g in chosen.tolist():
            members = self.members[g]
            pick = torch.randint(0, len(members), (self.group,), generator=self.generator)
            parts.append(members[pick])
        return torch.cat(parts)[: self.batch_size]


class DeviceGroupedBatches:
    """:class:`GroupedBatches` drawn on the device (the fast path): the members of every group padded into
    one tensor, groups and members chosen with ``generator`` (which lives on the device)."""

    def __init__(self, content: np.ndarray, batch_size: int, group: int, generator: torch.Generator):
        keys = content[:, 1] * 1000 + content[:, 2]  # colour, background
        members = [np.flatnonzero(keys == k) for k in np.unique(keys)]
        width = max(len(m) for m in members)
        table = np.zeros((len(members), width), dtype=np.int64)
        for g, m in enumerate(members):
            table[g, : len(m)] = m
        dev = generator.device
        self.table = torch.from_numpy(table).to(dev)
        self.counts = torch.tensor([len(m) for m in members], device=dev)
        self.batch_size, self.group, self.generator = batch_size, max(1, group), generator

    def __call__(self) -> torch.Tensor:
        groups = -(-self.batch_size // self.group)
        at = self.generator.device
        chosen = torch.randint(0, len(self.table), (groups,), generator=self.generator, device=at)
        u = torch.rand(groups, self.group, generator=self.generator, device=at)
        pick = (u * self.counts[chosen][:, None]).long().clamp(max=self.table.shape[1] - 1)
        return self.table[chosen[:, None], pick].flatten()[: self.batch_size]


@torch.no_grad()
def _embed_images(model, images: np.ndarray, device: torch.device, batch: int = 256) -> torch.Tensor:
    chunks = [torch.from_numpy(images[i : i + batch]).to(device) for i in range(0, len(images), batch)]
    size = model.config.vision_config.image_size
    return torch.cat([_features(model.get_image_features(pixel_values=clip_pixels(c, size))) for c in chunks])


@torch.no_grad()
def _embed_texts(model, ids: torch.Tensor, device: torch.device, batch: int = 512) -> torch.Tensor:
    chunks = [ids[i : i + batch].to(device) for i in range(0, len(ids), batch)]
    return torch.cat([_features(model.get_text_features(input_ids=c)) for c in chunks])


@torch.no_grad()
def evaluate_retrieval(model, arrays: WorldArrays, tokenizer, device: torch.device) -> dict[str, float]:
    """Caption retrieval among ``arrays``' own captions, and identification of its identities by nearest
    reference portrait (how much identity the CLIP role carries without ever being told identities).

    ``exact``: the image's own caption ranks first. ``content``: the first-ranked caption describes the
    same thing (same shape, colour and every captioned scene attribute -- another paraphrase of it counts).
    """
    model.eval()
    image_emb = _embed_images(model, arrays.images, device)
    ids, inverse = tokenize(arrays.captions, tokenizer)
    text_emb = _embed_texts(model, ids, device)[torch.from_numpy(inverse).to(device)]
    sims = image_emb @ text_emb.T
    content = content_labels(arrays)
    i2t = sims.argmax(1).cpu().numpy()
    t2i = sims.argmax(0).cpu().numpy()
    n = len(arrays)
    ref_ids = np.union1d(held_out_ids(), arrays.identity_ids)  # every held-out reference is a candidate
    ref_emb = _embed_images(model, reference_images(ref_ids), device)
    nearest = ref_ids[(image_emb @ ref_emb.T).argmax(1).cpu().numpy()]
    return {
        "eval_samples": n,
        "caption_retrieval_chance": 1.0 / n,
        "image_to_caption_exact_top1": float(np.mean(i2t == np.arange(n))),
        "image_to_caption_content_top1": float(np.mean(np.all(content[i2t] == content, axis=1))),
        "caption_to_image_content_top1": float(np.mean(np.all(content[t2i] == content, axis=1))),
        **{
            f"image_to_caption_{name}_top1": float(np.mean(content[i2t, k] == content[:, k]))
            for k, name in enumerate(CONTENT_NAMES)
        },
        "identification_top1": float(np.mean(nearest == arrays.identity_ids)),
        "identification_chance": 1.0 / len(ref_ids),
    }


def train_clip_vision(
    arrays: WorldArrays,
    output_dir: str | os.PathLike,
    *,
    steps: int = 3000,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    seed: int = 0,
    device: str = "cpu",
    config: dict[str, Any] | None = None,
    progress: bool = True,
    eval_arrays: WorldArrays | None = None,
    fast: bool | None = None,
    max_seconds: float | None = None,
    log_every: int = LOG_EVERY,
) -> dict[str, Any]:
    """Train the CLIP role on ``arrays`` (renders + captions, no identity labels) and save the vision tower
    to ``output_dir``. Returns the final loss, held-out caption retrieval accuracy and timings.

    ``eval_arrays`` (default: ``config["eval_samples"]`` renders of the held-out ids, a seed no training
    set uses) must be renders the model never trained on.

    ``fast`` (default: on a CUDA device) runs the step loop of :func:`_train_clip_fast` (renders, token ids
    and content labels on the device, :class:`DeviceGroupedBatches`, bfloat16 autocast for the towers and
    a float32 loss, fused AdamW, no host synchronisation per step, ``max_seconds`` a time cap); the CPU
    path is unchanged.
    """
    from ...encoders.clip import default_image_processor
    from ..tokenizer import clip_tokenizer

    cfg = {**DEFAULT_CONFIG, **(config or {})}
    started = time.perf_counter()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    tokenizer = clip_tokenizer()
    token_ids, caption_index = tokenize(arrays.captions, tokenizer)
    model = build_clip_model(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id).to(dev)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]
    warmup = min(cfg["warmup_steps"], max(1, steps // 10))
    n = len(arrays)
    if use_fast_path(dev, fast):
        loop = FastLoop(
            dev,
            steps,
            seed=seed,
            desc="clip-vision",
            batch_size=batch_size,
            log_every=log_every,
            max_seconds=max_seconds,
            progress=progress,
        )
        train_started, cpu_started = time.perf_counter(), time.process_time()
        losses = _train_clip_fast(
            model, groups, arrays, token_ids, caption_index, cfg, loop, learning_rate, warmup
        )
        fast_measurements = loop.measurements()
    else:
        train_started, cpu_started = time.perf_counter(), time.process_time()
        losses = _train_clip_cpu(
            model,
            groups,
            arrays,
            token_ids,
            caption_index,
            tokenizer,
            cfg,
            dev,
            generator,
            steps,
            batch_size,
            learning_rate,
            warmup,
            progress,
        )
        fast_measurements = {}
    train_seconds = time.perf_counter() - train_started
    train_cpu_seconds = time.process_time() - cpu_started  # all threads: what a busy machine hides

    if eval_arrays is None:
        eval_arrays = held_out_arrays(cfg["eval_samples"], seed)
    metrics = evaluate_retrieval(model, eval_arrays, tokenizer, dev)

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tower = vision_tower(model.cpu())
    tower.save_pretrained(str(output))
    default_image_processor().save_pretrained(str(output))
    follow_umask(output)  # safetensors writes 0600
    tail = losses[-max(1, min(50, len(losses) // 10)) :]
    return {
        "model": "CLIPVisionModelWithProjection",
        "output_dir": str(output),
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "train_samples": n,
        "config": cfg,
        "parameters": sum(p.numel() for p in tower.parameters()),
        "initial_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(tail)) if losses else None,
        "seconds_per_step": train_seconds / max(1, len(losses) if fast_measurements else steps),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started,
        **fast_measurements,
        **metrics,
    }


def _train_clip_cpu(
    model,
    groups,
    arrays,
    token_ids,
    caption_index,
    tokenizer,
    cfg,
    dev,
    generator,
    steps,
    batch_size,
    learning_rate,
    warmup,
    progress,
) -> list[float]:
    """The CLIP role's step loop as it has always run (the CPU path)."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.98), eps=1e-6)
    schedule = warmup_cosine(optimizer, steps, warmup)

    images = torch.from_numpy(arrays.images)
    content = torch.from_numpy(content_labels(arrays))
    batches = GroupedBatches(content.numpy(), batch_size, cfg["group_size"], generator)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="clip-vision", disable=not progress)
    for _ in bar:
        index = batches()
        batch = random_shift(images[index], cfg["max_shift"], generator).to(dev)
        ids = token_ids[torch.from_numpy(caption_index[index.numpy()])]
        ids = ids[:, : int((ids != tokenizer.eos_token_id).sum(1).max()) + 1].to(dev)  # trim shared padding
        loss = contrastive_loss(model, clip_pixels(batch, cfg["image_size"]), ids, content[index].to(dev))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def _train_clip_fast(
    model, groups, arrays: WorldArrays, token_ids, caption_index, cfg, loop: FastLoop, learning_rate, warmup
) -> list[float]:
    """The CLIP role's step loop on an accelerator (:class:`~.steps.FastLoop`). Captions keep their
    common padding (CLIP's causal text tower pools at the first end token, which padding after it cannot
    change), so no step waits on the host to trim it."""
    dev, generator = loop.device, loop.generator
    optimizer = loop.adamw(groups, lr=learning_rate, betas=(0.9, 0.98), eps=1e-6)
    schedule = loop.schedule(optimizer, warmup)
    images = torch.from_numpy(arrays.images).to(dev)
    rows = token_ids.to(dev)[torch.from_numpy(caption_index).long().to(dev)]  # [N, L]
    content_np = content_labels(arrays)
    content = torch.from_numpy(content_np).to(dev)
    batches = DeviceGroupedBatches(content_np, loop.batch_size, cfg["group_size"], generator)
    model.train()
    loop.start()
    for step in range(loop.steps):
        index = batches()
        batch = random_shift(images[index], cfg["max_shift"], generator)
        with loop.autocast():
            image = model.get_image_features(pixel_values=clip_pixels(batch, cfg["image_size"]))
            text = model.get_text_features(input_ids=rows[index])
        loss = _contrastive(_features(image), _features(text), model.logit_scale, content[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loop.record(step, loss)
        if loop.out_of_time():
            break
    return loop.finish()
