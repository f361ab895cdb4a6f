"""The world's text encoder and UNet: a miniature SD1.5 trained from scratch, saved as a diffusers pipeline.

A small ``transformers.CLIPTextModel`` (the real 49,408-token CLIP vocabulary, 77 positions) and a small
``diffusers.UNet2DConditionModel`` with cross-attention in every block (so every ``attn2`` exists for
IP-Adapter's processors) are trained *jointly* on SD1.5's objective: predict the noise added to VAE
latents (times the VAE's ``scaling_factor``) under SD1.5's DDPM schedule, conditioned on the text
encoder's ``last_hidden_state`` of the caption padded to 77 tokens, exactly as the pipeline encodes a
prompt at inference.

Captions: the identity caption most of the time; the scene-only caption ("a small creature on a beach")
``scene_caption_fraction`` of the time, so prompts without identity words are in distribution (the
text-only baseline identity transfer is measured against); the empty prompt ``empty_caption_fraction``
of the time, for classifier-free guidance. No flips or other augmentation: "left" and "right" are
captioned.

At a budget of a few thousand steps two things help: min-SNR-gamma loss weighting (Hang et al. 2023:
low-noise timesteps stop dominating the gradient) and an EMA of the weights; both are measured on a
held-out denoising loss at the end, and the EMA weights are kept only when they are better there.

The result is a complete ``StableDiffusionPipeline`` folder (VAE, text encoder, tokenizer, UNet, a fast
DPM-Solver++ inference scheduler built from the DDPM config, no safety checker) that
``StableDiffusionPipeline.from_pretrained`` loads and runs at ``height=width=64``.
"""

from __future__ import annotations

import math
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...outputs import follow_umask
from ..arrays import WorldArrays, held_out_arrays
from ..dataset import CHARACTER_WEIGHT, FACE_WEIGHT, subject_weights
from .steps import LOG_EVERY, FastLoop, shuffled_batches, use_fast_path, warmup_cosine
from .vae import loss_curve, to_pixels

#: Model and run settings; ``config=`` overrides any of them (CI trains a smaller model).
DEFAULT_CONFIG: dict[str, Any] = {
    "text_hidden_size": 64,  # also the UNet's cross_attention_dim; the 49408 x 64 embedding is 12.6 MB
    "text_num_hidden_layers": 3,
    "text_num_attention_heads": 4,
    "text_intermediate_size": 256,
    "block_out_channels": (32, 64, 128),  # latent 16x16 -> 8x8 -> 4x4
    "layers_per_block": 1,
    "attention_head_dim": (2, 4, 8),  # diffusers' name for the number of heads per block (16 dims each)
    "norm_num_groups": 8,
    "scene_caption_fraction": 0.1,
    "empty_caption_fraction": 0.1,
    "min_snr_gamma": 5.0,  # 0 disables the weighting
    "ema_decay": 0.999,  # 0 disables the EMA
    "weight_decay": 0.01,
    "warmup_steps": 100,
    "eval_samples": 512,  # held-out renders the denoising loss is measured on
}

#: SD1.5's noise schedule (its ``scheduler_config.json`` less the keys DDPM does not take).
SD15_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def training_scheduler():
    """The DDPM scheduler of SD1.5 training: noise is added with its ``alphas_cumprod``."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD15_SCHEDULE)


def inference_scheduler():
    """DPM-Solver++ (2M) on the same schedule, trailing timesteps (the first step starts from t=999, pure
    noise for a model trained on every timestep): good images in 20 steps."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(training_scheduler().config, timestep_spacing="trailing")


def build_text_encoder(config: dict[str, Any], tokenizer):
    """A fresh ``CLIPTextModel`` over the tokenizer's vocabulary (seeded by the caller)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    hidden = config["text_hidden_size"]
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=config["text_intermediate_size"],
            num_hidden_layers=config["text_num_hidden_layers"],
            num_attention_heads=config["text_num_attention_heads"],
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=hidden,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_unet(config: dict[str, Any], latent_channels: int = 4):
    """A fresh ``UNet2DConditionModel`` for ``latent_channels`` x16x16 latents (the VAE's
    ``config.latent_channels``) with cross-attention in every block."""
    from diffusers import UNet2DConditionModel

    blocks = len(config["block_out_channels"])
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=["CrossAttnDownBlock2D"] * blocks,
        up_block_types=["CrossAttnUpBlock2D"] * blocks,
        block_out_channels=list(config["block_out_channels"]),
        layers_per_block=config["layers_per_block"],
        attention_head_dim=config["attention_head_dim"],
        norm_num_groups=config["norm_num_groups"],
        cross_attention_dim=config["text_hidden_size"],
    )


def build_pipeline(vae, text_encoder, tokenizer, unet):
    """The ``StableDiffusionPipeline`` of the world's models (no safety checker, fast scheduler)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tokenize_padded(texts: np.ndarray, tokenizer) -> tuple[torch.Tensor, np.ndarray]:
    """Token ids of the distinct ``texts``, padded to 77 as the pipeline pads prompts, and each row's
    index into them."""
    unique, inverse = np.unique(np.asarray(texts).astype(str), return_inverse=True)
    ids = tokenizer(
        unique.tolist(), padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids
    return torch.tensor(ids, dtype=torch.long), inverse.reshape(-1)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, device: torch.device, batch: int = 256):
    """Posterior mean and std ``[N, C, h, w]`` of every image under the frozen VAE (on ``device``)."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        x = to_pixels(torch.from_numpy(images[start : start + batch]).to(device))
        posterior = vae.encode(x).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights for epsilon prediction: ``min(SNR, gamma) / SNR`` (1 where gamma <= 0)."""
    if gamma <= 0:
        return torch.ones(len(timesteps), device=timesteps.device)
    alpha = alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alpha / (1 - alpha)
    return snr.clamp(max=gamma) / snr


class _Batches:
    """Everything a training or evaluation step draws from: latents, token ids, the schedule."""

    def __init__(self, mean, std, scaling, token_sets, scheduler, device):
        self.mean, self.std, self.scaling = mean, std, scaling
        # {"caption" | "scene": (ids [U, 77], row index [N]), "empty": ids [1, 77]}
        self.token_sets = token_sets
        self.scheduler = scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device)
        self.device = device

    @classmethod
    def encode(cls, vae, tokenizer, data: WorldArrays, scheduler, device) -> _Batches:
        """Latent posteriors of ``data``'s images under the frozen ``vae``, and the token ids of its
        identity captions, its scene captions and the empty prompt."""
        mean, std = encode_latents(vae, data.images, device)
        empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length).input_ids
        token_sets = {
            "caption": tokenize_padded(data.captions, tokenizer),
            "scene": tokenize_padded(data.scene_captions, tokenizer),
            "empty": torch.tensor(empty),
        }
        return cls(mean, std, float(vae.config.scaling_factor), token_sets, scheduler, device)

    def tokens(self, index: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, 77]`` of rows ``index``: kind 0 identity caption, 1 scene caption, 2 empty."""
        tables = {name: self.token_sets[name][0] for name in ("caption", "scene")}
        return self.per_kind(index, kind, {**tables, "empty": self.token_sets["empty"]}).to(self.device)

    def per_kind(self, index: torch.Tensor, kind: torch.Tensor, tables: dict) -> torch.Tensor:
        """For rows ``index``, the row of ``tables["caption"]`` / ``tables["scene"]`` (one row per distinct
        caption, as in ``token_sets``) or ``tables["empty"]`` (one row), by ``kind`` 0 / 1 / 2."""
        rows = index.numpy()
        empty = tables["empty"]
        out = empty.repeat(len(rows), *[1] * (empty.dim() - 1))
        for k, name in ((0, "caption"), (1, "scene")):
            pick = kind == k
            if pick.any():
                distinct = torch.from_numpy(self.token_sets[name][1][rows[pick.numpy()]])
                out[pick.to(out.device)] = tables[name][distinct.to(out.device)]
        return out

    def noisy(self, index, generator, timesteps=None):
        """Latents sampled from the posteriors of rows ``index``, noised at random (or given) timesteps."""
        shape = (len(index), *self.mean.shape[1:])
        i = index.to(self.device)
        eps_z = torch.randn(shape, generator=generator).to(self.device)
        latents = (self.mean[i] + self.std[i] * eps_z) * self.scaling
        noise = torch.randn(shape, generator=generator).to(self.device)
        if timesteps is None:
            timesteps = torch.randint(
                0, self.scheduler.config.num_train_timesteps, (len(index),), generator=generator
            )
        timesteps = timesteps.to(self.device)
        return self.scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def _denoising_loss(text_encoder, unet, batches: _Batches, index, kind, generator, timesteps=None, gamma=0.0):
    noisy, noise, t = batches.noisy(index, generator, timesteps)
    context = text_encoder(batches.tokens(index, kind)).last_hidden_state
    pred = unet(noisy, t, encoder_hidden_states=context).sample
    per_sample = (pred - noise).pow(2).flatten(1).mean(1)
    return (snr_weights(batches.alphas_cumprod, t, gamma) * per_sample).mean()


def _device_rows(batches: _Batches) -> dict[str, torch.Tensor]:
    """Each row's index into the distinct identity / scene captions, as device tensors."""
    return {
        name: torch.from_numpy(batches.token_sets[name][1]).long().to(batches.device)
        for name in ("caption", "scene")
    }


def _pick_per_kind(
    rows: dict[str, torch.Tensor], index, kind, tables: dict[str, torch.Tensor]
) -> torch.Tensor:
    """:meth:`_Batches.per_kind` with everything on the device and no host round trip: the row of
    ``tables["caption"]`` / ``tables["scene"]`` or ``tables["empty"]`` for each of rows ``index``."""
    caption = tables["caption"][rows["caption"][index]]
    scene = tables["scene"][rows["scene"][index]]
    shape = (-1, *[1] * (caption.dim() - 1))
    out = torch.where(kind.view(shape) == 1, scene, tables["empty"].expand_as(caption))
    return torch.where(kind.view(shape) == 0, caption, out)


def _noisy_on_device(batches: _Batches, index: torch.Tensor, generator: torch.Generator):
    """:meth:`_Batches.noisy` with every draw made on the device (``generator`` lives there)."""
    dev = batches.device
    shape = (len(index), *batches.mean.shape[1:])
    eps_z = torch.randn(shape, generator=generator, device=dev)
    latents = (batches.mean[index] + batches.std[index] * eps_z) * batches.scaling
    noise = torch.randn(shape, generator=generator, device=dev)
    steps = batches.scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (len(index),), generator=generator, device=dev)
    return batches.scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def _random_kinds(n: int, generator: torch.Generator, p_empty: float, p_scene: float) -> torch.Tensor:
    u = torch.rand(n, generator=generator, device=generator.device)
    return torch.where(u < p_empty, 2, torch.where(u < p_empty + p_scene, 1, 0))


@torch.no_grad()
def evaluate_denoising(text_encoder, unet, batches: _Batches, batch: int = 128) -> dict[str, float]:
    """Unweighted noise-prediction MSE on held-out latents, the same noise and evenly spread timesteps
    for every prompt kind: with the identity caption, the scene-only caption and the empty prompt. The
    gaps (empty - caption, scene - caption) measure how much the text, and the identity words in it,
    tell the model."""
    text_encoder.eval()
    unet.eval()
    n = len(batches.mean)
    steps = batches.scheduler.config.num_train_timesteps
    timesteps = (torch.arange(n) * steps // n + steps // (2 * n)).clamp(max=steps - 1)
    out = {}
    for kind, name in ((0, "caption"), (1, "scene"), (2, "empty")):
        generator = torch.Generator().manual_seed(1234)
        total = 0.0
        for start in range(0, n, batch):
            index = torch.arange(start, min(n, start + batch))
            kinds = torch.full((len(index),), kind)
            loss = _denoising_loss(text_encoder, unet, batches, index, kinds, generator, timesteps[index])
            total += float(loss) * len(index)
        out[f"eval_loss_{name}"] = total / n
    out["text_gain"] = out["eval_loss_empty"] - out["eval_loss_caption"]
    out["identity_words_gain"] = out["eval_loss_scene"] - out["eval_loss_caption"]
    text_encoder.train()
    unet.train()
    return out


def train_text_unet(
    arrays: WorldArrays,
    vae_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    steps: int = 4000,
    batch_size: int = 32,
    learning_rate: float = 5e-4,
    seed: int = 0,
    device: str = "cpu",
    config: dict[str, Any] | None = None,
    progress: bool = True,
    eval_arrays: WorldArrays | None = None,
    fast: bool | None = None,
    max_seconds: float | None = None,
    log_every: int = LOG_EVERY,
    compile: bool = False,
) -> dict[str, Any]:
    """Train the text encoder and UNet jointly on ``arrays`` with the frozen VAE in ``vae_dir`` and save
    the whole ``StableDiffusionPipeline`` to ``output_dir``. Returns losses, held-out denoising losses
    (with and without EMA, per prompt kind) and timings.

    ``eval_arrays`` (default: ``config["eval_samples"]`` renders of the held-out ids) must be renders the
    models never trained on.

    The UNet's latent channels are the VAE's (``vae.config.latent_channels``: 4, 8 or 16). ``fast``
    (default: on a CUDA device) runs the step loop of :func:`_train_text_unet_fast`: latents and token
    ids on the device, bfloat16 autocast, fused AdamW, no host synchronisation per step, ``max_seconds``
    a time cap, ``compile`` a ``torch.compile``'d UNet. The CPU path is unchanged.
    """
    from diffusers import AutoencoderKL

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
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).to(dev).eval().requires_grad_(False)
    scaling = float(vae.config.scaling_factor)
    scheduler = training_scheduler()
    if eval_arrays is None:
        eval_arrays = held_out_arrays(cfg["eval_samples"], seed)

    encode_started = time.perf_counter()
    train = _Batches.encode(vae, tokenizer, arrays, scheduler, dev)
    held_out = _Batches.encode(vae, tokenizer, eval_arrays, scheduler, dev)
    encode_seconds = time.perf_counter() - encode_started

    text_encoder = build_text_encoder(cfg, tokenizer).to(dev).train()
    unet = build_unet(cfg, int(vae.config.latent_channels)).to(dev).train()
    params = [*text_encoder.parameters(), *unet.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    loop = None
    if use_fast_path(dev, fast):
        loop = FastLoop(
            dev,
            steps,
            seed=seed,
            desc="text+unet",
            batch_size=batch_size,
            log_every=log_every,
            max_seconds=max_seconds,
            progress=progress,
        )
    optimizer = (loop.adamw if loop else torch.optim.AdamW)(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
        lr=learning_rate,
    )
    warmup = min(cfg["warmup_steps"], max(1, steps // 10))
    schedule = loop.schedule(optimizer, warmup) if loop else warmup_cosine(optimizer, steps, warmup)
    ema = [p.detach().clone() for p in params] if cfg["ema_decay"] > 0 else None
    initial_eval = evaluate_denoising(text_encoder, unet, held_out)

    n = len(arrays)
    train_started = time.perf_counter()
    if loop is not None:
        losses = _train_text_unet_fast(
            text_encoder, unet, params, optimizer, schedule, ema, train, cfg, loop, compile
        )
    else:
        losses = _train_text_unet_cpu(
            text_encoder,
            unet,
            params,
            optimizer,
            schedule,
            ema,
            train,
            cfg,
            generator,
            steps,
            batch_size,
            progress,
        )
    train_seconds = time.perf_counter() - train_started

    final_eval = evaluate_denoising(text_encoder, unet, held_out)
    ema_eval, ema_used = None, False
    if ema is not None:
        raw = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in params], ema)
        ema_eval = evaluate_denoising(text_encoder, unet, held_out)
        ema_used = ema_eval["eval_loss_caption"] < final_eval["eval_loss_caption"]
        if not ema_used:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in params], raw)

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(vae.cpu(), text_encoder.cpu().eval(), tokenizer, unet.cpu().eval())
    pipe.save_pretrained(str(output), safe_serialization=True)
    follow_umask(output)  # safetensors writes 0600
    tail = losses[-max(1, min(50, len(losses) // 10)) :]
    return {
        "model": "StableDiffusionPipeline",
        "output_dir": str(output),
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "train_samples": n,
        "eval_samples": len(eval_arrays),
        "config": cfg,
        "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "vae_scaling_factor": scaling,
        "initial_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(tail)) if losses else None,
        "loss_curve": loss_curve(losses),
        "initial_eval": initial_eval,
        "final_eval_raw": final_eval,
        "final_eval_ema": ema_eval,
        "ema_used": ema_used,
        **(ema_eval if ema_used else final_eval),
        "encode_seconds": encode_seconds,
        "seconds_per_step": train_seconds / max(1, len(losses) if loop else steps),
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - started,
        **(loop.measurements() if loop else {}),
    }


def _train_text_unet_cpu(
    text_encoder,
    unet,
    params,
    optimizer,
    schedule,
    ema,
    train: _Batches,
    cfg,
    generator,
    steps,
    batch_size,
    progress,
) -> list[float]:
    """:func:`train_text_unet`'s step loop as it has always run (the CPU path)."""
    from tqdm.auto import tqdm

    p_empty, p_scene = cfg["empty_caption_fraction"], cfg["scene_caption_fraction"]
    batches = shuffled_batches(len(train.mean), batch_size, generator)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="text+unet", disable=not progress)
    for step in bar:
        index = next(batches)
        u = torch.rand(len(index), generator=generator)
        kind = torch.where(u < p_empty, 2, torch.where(u < p_empty + p_scene, 1, 0))
        loss = _denoising_loss(text_encoder, unet, train, index, kind, generator, gamma=cfg["min_snr_gamma"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            decay_now = min(cfg["ema_decay"], (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay_now)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def _train_text_unet_fast(
    text_encoder, unet, params, optimizer, schedule, ema, train: _Batches, cfg, loop: FastLoop, compile: bool
) -> list[float]:
    """:func:`train_text_unet`'s step loop on an accelerator (:class:`~.steps.FastLoop`): the same
    objective, with latents, token ids and every draw on the device."""
    dev, generator = loop.device, loop.generator
    rows = _device_rows(train)
    tables = {
        "caption": train.token_sets["caption"][0].to(dev),
        "scene": train.token_sets["scene"][0].to(dev),
        "empty": train.token_sets["empty"].to(dev),
    }
    step_unet = torch.compile(unet) if compile else unet
    p_empty, p_scene = cfg["empty_caption_fraction"], cfg["scene_caption_fraction"]
    batches = loop.batches(len(train.mean))
    loop.start()
    for step in range(loop.steps):
        index = next(batches)
        kind = _random_kinds(len(index), generator, p_empty, p_scene)
        noisy, noise, t = _noisy_on_device(train, index, generator)
        with loop.autocast():
            context = text_encoder(_pick_per_kind(rows, index, kind, tables)).last_hidden_state
            pred = step_unet(noisy, t, encoder_hidden_states=context).sample
        per_sample = (pred.float() - noise).pow(2).flatten(1).mean(1)
        loss = (snr_weights(train.alphas_cumprod, t, cfg["min_snr_gamma"]) * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            decay_now = min(cfg["ema_decay"], (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay_now)
        loop.record(step, loss)
        if loop.out_of_time():
            break
    return loop.finish()


def _label_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


@torch.no_grad()
def sample_grid(
    pipe,
    prompts: list[str],
    seed: int = 0,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    columns: int | None = None,
    scale: int = 3,
    labels: list[str] | None = None,
):
    """One 64x64 image per prompt (prompt ``i`` with seed ``seed + i``) in a grid, each upscaled ``scale``
    times (nearest) with its prompt (or ``labels[i]``) written beneath: a sheet for eyeballing a model."""
    from PIL import Image, ImageDraw

    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        list(prompts),
        height=64,
        width=64,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generators,
    ).images
    columns = columns or min(len(prompts), 6)
    rows = math.ceil(len(prompts) / columns)
    tile = 64 * scale
    font = _label_font(11)
    chars = max(8, tile // 6)
    texts = [textwrap.wrap(t, chars)[:4] for t in (labels or prompts)]
    label_h = 13 * max((len(t) for t in texts), default=1) + 4
    sheet = Image.new("RGB", (columns * tile, rows * (tile + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, texts, strict=True)):
        x, y = (i % columns) * tile, (i // columns) * (tile + label_h)
        sheet.paste(image.resize((tile, tile), Image.NEAREST), (x, y))
        for k, line in enumerate(lines):
            draw.text((x + 2, y + tile + 2 + 13 * k), line, fill="black", font=font)
    return sheet


def character_weights(arrays: WorldArrays, latent_size: int, character: float, face: float) -> torch.Tensor:
    """Per latent pixel loss weights ``[N, 1, h, w]`` (:func:`~idcraft.world.dataset.subject_weights` of
    every sample's character and face boxes)."""
    weights = subject_weights(
        arrays.bbox, arrays.face_bbox, arrays.images.shape[1], latent_size, character, face
    )
    return torch.from_numpy(weights)[:, None]


def finetune_unet(
    arrays: WorldArrays,
    sd_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    steps: int = 2000,
    batch_size: int = 32,
    learning_rate: float = 2e-4,
    seed: int = 0,
    device: str = "cpu",
    character_weight: float = CHARACTER_WEIGHT,
    face_weight: float = FACE_WEIGHT,
    progress: bool = True,
    eval_arrays: WorldArrays | None = None,
    fast: bool | None = None,
    max_seconds: float | None = None,
    log_every: int = LOG_EVERY,
    compile: bool = False,
) -> dict[str, Any]:
    """Train the UNet of the pipeline in ``sd_dir`` further on the *character*, and save the pipeline to
    ``output_dir`` (text encoder, VAE and tokenizer unchanged).

    Why: the first training spends most of its loss on backgrounds (large, and fixed by the caption) and,
    under min-SNR weighting, little on low-noise steps -- where eyes, mouths and patterns are drawn -- so
    the model paints characters as featureless blobs and even erases a face it is given at low noise.
    This stage weights the noise-prediction loss up inside the character's and its face's boxes and
    drops the min-SNR weighting (uniform timesteps, plain MSE), so the details the adapters must carry
    become things the UNet can draw.

    ``fast`` (default: on a CUDA device): the step loop of :func:`_finetune_unet_fast` (see
    :func:`train_text_unet`); the CPU path is unchanged."""
    from diffusers import StableDiffusionPipeline
    from tqdm.auto import tqdm

    from ...training.diffusion import weighted_mse  # the loss idcraft train uses with loss masks

    started = time.perf_counter()
    dev = torch.device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None)
    vae = pipe.vae.to(dev).eval().requires_grad_(False)
    text_encoder = pipe.text_encoder.to(dev).eval().requires_grad_(False)
    unet = pipe.unet.to(dev).train()
    tokenizer, scheduler = pipe.tokenizer, training_scheduler()
    if eval_arrays is None:
        eval_arrays = held_out_arrays(DEFAULT_CONFIG["eval_samples"], seed)
    train = _Batches.encode(vae, tokenizer, arrays, scheduler, dev)
    held_out = _Batches.encode(vae, tokenizer, eval_arrays, scheduler, dev)
    weights = character_weights(arrays, train.mean.shape[-1], character_weight, face_weight).to(dev)
    initial_eval = evaluate_denoising(text_encoder, unet, held_out)
    text_encoder.eval()
    with torch.no_grad():  # the text encoder is frozen: embed each distinct caption once
        embedded = {
            name: torch.cat(
                [text_encoder(ids[i : i + 256].to(dev)).last_hidden_state for i in range(0, len(ids), 256)]
            )
            for name, (ids, _) in ((n, train.token_sets[n]) for n in ("caption", "scene"))
        }
        embedded["empty"] = text_encoder(train.token_sets["empty"].to(dev)).last_hidden_state

    params = list(unet.parameters())
    warmup = min(100, max(1, steps // 10))
    loop = None
    if use_fast_path(dev, fast):
        loop = FastLoop(
            dev,
            steps,
            seed=seed,
            desc="unet (characters)",
            batch_size=batch_size,
            log_every=log_every,
            max_seconds=max_seconds,
            progress=progress,
        )
        optimizer = loop.adamw(params, lr=learning_rate, weight_decay=DEFAULT_CONFIG["weight_decay"])
        schedule = loop.schedule(optimizer, warmup)
        losses = _finetune_unet_fast(
            unet, params, optimizer, schedule, train, embedded, weights, loop, compile
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=DEFAULT_CONFIG["weight_decay"])
        schedule = warmup_cosine(optimizer, steps, warmup)
        n = len(arrays)
        p_empty, p_scene = DEFAULT_CONFIG["empty_caption_fraction"], DEFAULT_CONFIG["scene_caption_fraction"]
        batches = shuffled_batches(n, batch_size, generator)
        losses = []
        for _ in tqdm(range(steps), desc="unet (characters)", disable=not progress):
            index = next(batches)
            u = torch.rand(len(index), generator=generator)
            kind = torch.where(u < p_empty, 2, torch.where(u < p_empty + p_scene, 1, 0))
            noisy, noise, t = train.noisy(index, generator)
            pred = unet(noisy, t, encoder_hidden_states=train.per_kind(index, kind, embedded)).sample
            loss = weighted_mse(pred, noise, weights[index.to(dev)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
    final_eval = evaluate_denoising(text_encoder, unet, held_out)
    text_encoder.eval()
    unet.eval()
    pipe.unet = unet.cpu()
    pipe.vae, pipe.text_encoder = vae.cpu(), text_encoder.cpu()
    pipe.save_pretrained(str(output_dir), safe_serialization=True)
    follow_umask(output_dir)  # safetensors writes 0600
    return {
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "character_weight": character_weight,
        "face_weight": face_weight,
        "loss_curve": loss_curve(losses),
        "initial_eval": initial_eval,
        "final_eval": final_eval,
        "seconds": time.perf_counter() - started,
        **(loop.measurements() if loop else {}),
    }


def _finetune_unet_fast(unet, params, optimizer, schedule, train: _Batches, embedded, weights, loop, compile):
    """:func:`finetune_unet`'s step loop on an accelerator (:class:`~.steps.FastLoop`)."""
    from ...training.diffusion import weighted_mse

    generator = loop.generator
    rows = _device_rows(train)
    step_unet = torch.compile(unet) if compile else unet
    p_empty, p_scene = DEFAULT_CONFIG["empty_caption_fraction"], DEFAULT_CONFIG["scene_caption_fraction"]
    batches = loop.batches(len(train.mean))
    loop.start()
    for step in range(loop.steps):
        index = next(batches)
        kind = _random_kinds(len(index), generator, p_empty, p_scene)
        noisy, noise, t = _noisy_on_device(train, index, generator)
        with loop.autocast():
            pred = step_unet(
                noisy, t, encoder_hidden_states=_pick_per_kind(rows, index, kind, embedded)
            ).sample
        loss = weighted_mse(pred, noise, weights[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        loop.record(step, loss)
        if loop.out_of_time():
            break
    return loop.finish()
