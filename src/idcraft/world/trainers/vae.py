"""The world's VAE: a small ``diffusers.AutoencoderKL`` with SD's structure and a 4x (not 8x) downsampling.

64x64 renders become 4x16x16 latents (three encoder blocks, two of them downsampling). The factor is 4
because an identity's fine details -- eye colour, a pattern, a two-pixel accessory -- are a few pixels
wide: at SD's factor 8 a whole eye would share one latent pixel with its surroundings.

The loss is reconstruction only (L1 plus an L1 on horizontal and vertical image gradients, which weights
edges, where the small details live) and a tiny KL term that keeps the posterior a proper distribution;
no LPIPS or GAN, which the flat-shaded renders do not need. Training sees 32x32 crops (the VAE is fully
convolutional, as SD's VAE was trained on crops too): a quarter of the compute per sample, and half the
crops are centred on the character's face so the details get most of the training signal.

After training, ``scaling_factor`` is set to 1 / (std of latents sampled from the posterior of a batch),
as SD1.5's 0.18215 was, so the diffusion model sees unit-variance latents; diffusers reads it from
``vae.config.scaling_factor``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...outputs import follow_umask
from ..arrays import WorldArrays, held_out_arrays
from .steps import LOG_EVERY, FastLoop, shuffled_batches, use_fast_path, warmup_cosine

#: Model and run settings; ``config=`` overrides any of them (CI trains a smaller model).
DEFAULT_CONFIG: dict[str, Any] = {
    "block_out_channels": (32, 64, 64),  # three blocks: 64 -> 32 -> 16, downsampling factor 4
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "crop": 32,  # training crop size (0: whole 64x64 images)
    "face_crop_fraction": 0.5,  # share of crops centred on the face (the rest uniformly placed)
    "gradient_weight": 1.0,  # weight of the L1 loss on image gradients (edges)
    "kl_weight": 1e-6,  # on the per-sample KL (summed over latent elements)
    "initial_logvar": -6.0,  # initial posterior log-variance (bias of the encoder's logvar outputs)
    "warmup_steps": 50,
    "eval_samples": 512,  # held-out renders PSNR and the scaling factor are measured on
}


def build_vae(config: dict[str, Any]):
    """A fresh ``AutoencoderKL`` of ``config``'s sizes (seeded by the caller).

    The encoder's log-variance outputs start at ``initial_logvar`` instead of 0: a posterior std of 1 at
    the start buries the latents in sampling noise, and with a tiny KL weight the encoder would spend
    hundreds of steps only learning to shrink it (blurry, colour-shifted reconstructions meanwhile)."""
    from diffusers import AutoencoderKL

    blocks = len(config["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=list(config["block_out_channels"]),
        layers_per_block=config["layers_per_block"],
        latent_channels=config["latent_channels"],
        norm_num_groups=config["norm_num_groups"],
        sample_size=64,
    )
    latent = config["latent_channels"]
    with torch.no_grad():
        vae.encoder.conv_out.bias[latent:].fill_(config["initial_logvar"])
    return vae


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [-1, 1] (the range diffusers VAEs use)."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def random_crops(
    images: torch.Tensor, face_bbox: torch.Tensor, size: int, face_fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """``size`` x ``size`` crops of uint8 ``[B, S, S, 3]`` images: a ``face_fraction`` of them centred on
    the face box (jittered by up to a quarter crop), the rest placed uniformly."""
    b, s = images.shape[0], images.shape[1]
    if size <= 0 or size >= s:
        return images
    at = generator.device  # draws are made where the generator lives (the CPU path: the CPU)
    uniform = torch.randint(0, s - size + 1, (b, 2), generator=generator, device=at)
    centre = (face_bbox[:, :2] + face_bbox[:, 2:]) / 2
    jitter = torch.randint(-(size // 4), size // 4 + 1, (b, 2), generator=generator, device=at)
    on_face = (centre.to(at).round().long() - size // 2 + jitter).clamp(0, s - size)
    use_face = torch.rand(b, generator=generator, device=at) < face_fraction
    origin = torch.where(use_face[:, None], on_face, uniform).to(images.device)
    offsets = torch.arange(size, device=images.device)
    rows = (origin[:, 1:2] + offsets)[:, :, None]
    cols = (origin[:, 0:1] + offsets)[:, None, :]
    return images[torch.arange(b, device=images.device)[:, None, None], rows, cols]


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, gradient_weight: float) -> torch.Tensor:
    """L1 on pixels plus ``gradient_weight`` x L1 on horizontal and vertical finite differences."""
    loss = (recon - target).abs().mean()
    if gradient_weight > 0:
        dx = (recon.diff(dim=-1) - target.diff(dim=-1)).abs().mean()
        dy = (recon.diff(dim=-2) - target.diff(dim=-2)).abs().mean()
        loss = loss + gradient_weight * (dx + dy) / 2
    return loss


@torch.no_grad()
def evaluate_vae(vae, arrays: WorldArrays, device: torch.device, batch: int = 128) -> dict[str, float]:
    """Round-trip PSNR (posterior mean, decoded) on ``arrays``, over whole images and inside the face
    boxes, and the statistics of posterior samples the scaling factor is set from."""
    generator = torch.Generator().manual_seed(0)
    sq_err, face_err, face_px, latents = [], 0.0, 0.0, []
    for start in range(0, len(arrays), batch):
        x = to_pixels(torch.from_numpy(arrays.images[start : start + batch])).to(device)
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        latents.append((posterior.mean + posterior.std * noise).cpu())
        recon = vae.decode(posterior.mean).sample.clamp(-1, 1)
        err = ((recon - x) / 2).pow(2).mean(1).cpu()  # [B, H, W] in [0, 1] units
        sq_err.append(err.flatten(1).mean(1))
        boxes = arrays.face_bbox[start : start + batch]
        for k, (x0, y0, x1, y1) in enumerate(np.round(boxes).astype(int).clip(0, err.shape[-1])):
            region = err[k, y0:y1, x0:x1]
            face_err += float(region.sum())
            face_px += region.numel()
    per_image = torch.cat(sq_err)
    z = torch.cat(latents)
    return {
        "psnr": float(10 * torch.log10(1 / per_image.mean())),
        "psnr_median_image": float(10 * torch.log10(1 / per_image.median())),
        "psnr_face": float(10 * math.log10(face_px / max(face_err, 1e-12))),
        "latent_mean": float(z.mean()),
        "latent_std": float(z.std()),
        "latent_channel_std": [float(v) for v in z.transpose(0, 1).flatten(1).std(1)],
    }


def loss_curve(losses: list[float], points: int = 20) -> list[float]:
    """Mean training loss over each of ``points`` equal stretches of the run (for the build record)."""
    if not losses:
        return []
    return [float(np.mean(chunk)) for chunk in np.array_split(np.asarray(losses), min(points, len(losses)))]


def train_vae(
    arrays: WorldArrays,
    output_dir: str | os.PathLike,
    *,
    steps: int = 1200,
    batch_size: int = 32,
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
    """Train the world's ``AutoencoderKL`` on ``arrays``' renders, set its ``scaling_factor`` from held-out
    latents and save it (diffusers format) to ``output_dir``. Returns losses, held-out PSNR, the latent
    statistics and timings.

    ``eval_arrays`` (default: ``config["eval_samples"]`` renders of the held-out ids) must be renders the
    model never trained on.

    ``fast`` (default: on a CUDA device) runs :func:`_train_vae_fast` (bfloat16 autocast, renders kept on
    the device, fused AdamW, no host synchronisation per step, ``max_seconds`` a time cap); the CPU path
    is unchanged.
    """
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    started = time.perf_counter()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    vae = build_vae(cfg).to(dev).train()
    warmup = min(cfg["warmup_steps"], max(1, steps // 10))
    n = len(arrays)
    fast_measurements: dict[str, Any] = {}
    if use_fast_path(dev, fast):
        loop = FastLoop(
            dev,
            steps,
            seed=seed,
            desc="vae",
            batch_size=batch_size,
            log_every=log_every,
            max_seconds=max_seconds,
            progress=progress,
        )
        train_started = time.perf_counter()
        losses = _train_vae_fast(vae, arrays, cfg, loop, learning_rate, warmup)
        fast_measurements = loop.measurements()
    else:
        train_started = time.perf_counter()
        losses = _train_vae_cpu(
            vae, arrays, cfg, dev, generator, steps, batch_size, learning_rate, warmup, progress
        )
    train_seconds = time.perf_counter() - train_started

    if eval_arrays is None:
        eval_arrays = held_out_arrays(cfg["eval_samples"], seed)
    vae.eval()
    metrics = evaluate_vae(vae, eval_arrays, dev)
    scaling = 1.0 / max(metrics["latent_std"], 1e-6)
    vae.register_to_config(scaling_factor=scaling)

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    vae.cpu().save_pretrained(str(output), safe_serialization=True)
    follow_umask(output)  # safetensors writes 0600
    tail = losses[-max(1, min(50, len(losses) // 10)) :]
    return {
        "model": "AutoencoderKL",
        "output_dir": str(output),
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "train_samples": n,
        "eval_samples": len(eval_arrays),
        "config": cfg,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "initial_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(tail)) if losses else None,
        "loss_curve": loss_curve(losses),
        "scaling_factor": scaling,
        "seconds_per_step": train_seconds / max(1, len(losses) if fast_measurements else steps),
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - started,
        **fast_measurements,
        **metrics,
    }


def _train_vae_cpu(vae, arrays, cfg, dev, generator, steps, batch_size, learning_rate, warmup, progress):
    """The VAE's step loop as it has always run (the CPU path): returns each step's reconstruction loss."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps, warmup)

    images = torch.from_numpy(arrays.images)
    face_bbox = torch.from_numpy(arrays.face_bbox)
    n = len(arrays)
    batches = shuffled_batches(n, batch_size, generator)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="vae", disable=not progress)
    for _ in bar:
        index = next(batches)
        crops = random_crops(
            images[index], face_bbox[index], cfg["crop"], cfg["face_crop_fraction"], generator
        )
        x = to_pixels(crops.to(dev))
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(dev)
        recon = vae.decode(posterior.mean + posterior.std * noise).sample
        rec = reconstruction_loss(recon, x, cfg["gradient_weight"])
        loss = rec + cfg["kl_weight"] * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(rec.detach()))
        bar.set_postfix(rec=f"{losses[-1]:.4f}")
    return losses


def _train_vae_fast(vae, arrays: WorldArrays, cfg: dict[str, Any], loop: FastLoop, learning_rate, warmup):
    """The VAE's step loop on an accelerator: renders (uint8) and face boxes on the device, crops and
    posterior noise drawn there, bfloat16 autocast, fused AdamW, losses read every ``log_every`` steps."""
    dev = loop.device
    optimizer = loop.adamw(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = loop.schedule(optimizer, warmup)
    images = torch.from_numpy(arrays.images).to(dev)
    face_bbox = torch.from_numpy(arrays.face_bbox).to(dev)
    batches = loop.batches(len(arrays))
    params = list(vae.parameters())
    loop.start()
    for step in range(loop.steps):
        index = next(batches)
        crops = random_crops(
            images[index], face_bbox[index], cfg["crop"], cfg["face_crop_fraction"], loop.generator
        )
        x = to_pixels(crops)
        with loop.autocast():
            posterior = vae.encode(x).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=loop.generator, device=dev)
            recon = vae.decode(posterior.mean + posterior.std * noise).sample
        rec = reconstruction_loss(recon.float(), x, cfg["gradient_weight"])
        loss = rec + cfg["kl_weight"] * posterior.kl().float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        loop.record(step, rec)
        if loop.out_of_time():
            break
    return loop.finish()


def finetune_decoder(
    arrays: WorldArrays,
    vae_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    steps: int = 1500,
    batch_size: int = 32,
    learning_rate: float = 5e-4,
    seed: int = 0,
    device: str = "cpu",
    face_crop_fraction: float = 0.75,
    progress: bool = True,
    eval_arrays: WorldArrays | None = None,
    fast: bool | None = None,
    max_seconds: float | None = None,
    log_every: int = LOG_EVERY,
) -> dict[str, Any]:
    """Train only the decoder of the VAE in ``vae_dir`` further (as SD's ft-MSE decoder was), mostly on
    face crops, and save the VAE to ``output_dir``.

    The encoder, and so the latent space and ``scaling_factor``, stay exactly as they were: a UNet trained
    on these latents needs no retraining, yet every method draws sharper eyes, mouths and patterns -- the
    fine identity detail a reference has to carry. Decoding sees posterior *samples*, so the decoder
    also learns to forgive the small latent errors a sampler leaves.

    ``fast`` (default: on a CUDA device): the step loop of :func:`_finetune_decoder_fast`; the CPU path is
    unchanged."""
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    started = time.perf_counter()
    dev = torch.device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).to(dev)
    vae.requires_grad_(False)
    trainable = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    vae.eval()
    vae.decoder.train()
    if eval_arrays is None:
        eval_arrays = held_out_arrays(DEFAULT_CONFIG["eval_samples"], seed)
    if use_fast_path(dev, fast):
        before = evaluate_vae(vae, eval_arrays, dev)
        loop = FastLoop(
            dev,
            steps,
            seed=seed,
            desc="vae decoder",
            batch_size=batch_size,
            log_every=log_every,
            max_seconds=max_seconds,
            progress=progress,
        )
        losses = _finetune_decoder_fast(vae, trainable, arrays, face_crop_fraction, loop, learning_rate)
        vae.eval()
        return _save_decoder(
            vae,
            eval_arrays,
            dev,
            output_dir,
            before,
            losses,
            started,
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            face_crop_fraction=face_crop_fraction,
            **loop.measurements(),
        )
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps, warmup=0)
    before = evaluate_vae(vae, eval_arrays, dev)

    images, face_bbox = torch.from_numpy(arrays.images), torch.from_numpy(arrays.face_bbox)
    n = len(arrays)
    batches = shuffled_batches(n, batch_size, generator)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="vae decoder", disable=not progress)
    for _ in bar:
        index = next(batches)
        crops = random_crops(
            images[index], face_bbox[index], DEFAULT_CONFIG["crop"], face_crop_fraction, generator
        )
        x = to_pixels(crops.to(dev))
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator).to(dev)
            latents = posterior.mean + posterior.std * noise
        recon = vae.decode(latents).sample
        loss = reconstruction_loss(recon, x, DEFAULT_CONFIG["gradient_weight"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(rec=f"{losses[-1]:.4f}")
    vae.eval()
    return _save_decoder(
        vae,
        eval_arrays,
        dev,
        output_dir,
        before,
        losses,
        started,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        face_crop_fraction=face_crop_fraction,
    )


def _save_decoder(vae, eval_arrays, dev, output_dir, before, losses, started, **settings) -> dict[str, Any]:
    after = evaluate_vae(vae, eval_arrays, dev)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    vae.cpu().save_pretrained(str(output), safe_serialization=True)
    follow_umask(output)  # safetensors writes 0600
    return {
        **{
            k: settings.pop(k) for k in ("steps", "batch_size", "learning_rate", "seed", "face_crop_fraction")
        },
        "loss_curve": loss_curve(losses),
        "psnr_before": before["psnr"],
        "psnr_face_before": before["psnr_face"],
        "psnr": after["psnr"],
        "psnr_face": after["psnr_face"],
        "seconds": time.perf_counter() - started,
        **settings,
    }


def _finetune_decoder_fast(vae, trainable, arrays: WorldArrays, face_fraction: float, loop: FastLoop, lr):
    """:func:`finetune_decoder`'s step loop on an accelerator (see :class:`~.steps.FastLoop`)."""
    dev = loop.device
    optimizer = loop.adamw(trainable, lr=lr, weight_decay=0.0)
    schedule = loop.schedule(optimizer, warmup=1)
    images = torch.from_numpy(arrays.images).to(dev)
    face_bbox = torch.from_numpy(arrays.face_bbox).to(dev)
    batches = loop.batches(len(arrays))
    loop.start()
    for step in range(loop.steps):
        index = next(batches)
        crops = random_crops(
            images[index], face_bbox[index], DEFAULT_CONFIG["crop"], face_fraction, loop.generator
        )
        x = to_pixels(crops)
        with loop.autocast():
            with torch.no_grad():
                posterior = vae.encode(x).latent_dist
                noise = torch.randn(posterior.mean.shape, generator=loop.generator, device=dev)
                latents = posterior.mean + posterior.std * noise
            recon = vae.decode(latents).sample
        loss = reconstruction_loss(recon.float(), x, DEFAULT_CONFIG["gradient_weight"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        loop.record(step, loss)
        if loop.out_of_time():
            break
    return loop.finish()


@torch.no_grad()
def round_trip(vae, images: np.ndarray, device: torch.device | str, batch: int = 256) -> np.ndarray:
    """uint8 ``[N, 64, 64, 3]`` renders encoded (posterior mean) and decoded by ``vae``, as uint8 images
    (what the ``vae`` baseline of ``idcraft eval`` shows the judge)."""
    out = []
    for start in range(0, len(images), batch):
        x = to_pixels(torch.from_numpy(images[start : start + batch])).to(device)
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1).float().cpu()
        out.append(((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def vae_ceiling(vae, judge, arrays: WorldArrays, device: torch.device | str = "cpu") -> dict[str, Any]:
    """What any method drawing through ``vae``'s latent space can keep at most: the judge's identity
    accuracy (all / coarse / fine, :func:`~idcraft.world.judge.identity_accuracy`) and prompt accuracy
    on ``arrays``' renders after a VAE round trip, beside the same on the renders themselves, and the
    round trip's PSNR over whole images and inside the face boxes. The ``vae`` row of ``idcraft eval``
    measures the same on its own requests; the goal for a VAE that keeps faces is fine >= 0.85."""
    from ..judge import _labels, identity_accuracy, prompt_accuracy

    labels = _labels(arrays)
    n_attr = arrays.attributes.shape[1]
    out: dict[str, Any] = {"samples": len(arrays)}
    for name, images in (("vae", round_trip(vae, arrays.images, device)), ("render", arrays.images)):
        predicted = judge.predict(images)
        out[name] = {
            **{k: round(v, 4) for k, v in identity_accuracy(predicted, labels[:, :n_attr]).items()},
            "prompt": round(prompt_accuracy(predicted, labels[:, n_attr:]), 4),
        }
    metrics = evaluate_vae(vae, arrays, torch.device(device))
    out["psnr"], out["psnr_face"] = round(metrics["psnr"], 3), round(metrics["psnr_face"], 3)
    return out
