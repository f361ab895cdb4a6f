"""The noise-prediction objective on a frozen SD1.x / SDXL base, shared by every UNet adapter recipe.

Per batch, as in the official IP-Adapter training scripts:

1. draw the classifier-free-guidance drops per sample: ``u < p_image`` drops the image, ``u < p_image +
   p_text`` drops the text (empty caption), ``u < p_image + p_text + p_both`` drops both;
2. encode the target images with the frozen VAE (a sample of the latent distribution, times the
   scaling factor), draw Gaussian noise (plus optional offset noise) and a uniform timestep per sample,
   and noise the latents with a DDPM schedule built from the base's scheduler config;
3. encode the captions with the base's own text encoder(s) (``encode_prompt``: SD1.x last hidden
   state; SDXL penultimate states of both encoders and the pooled embedding), and for SDXL the added
   time ids ``(original h, w, crop top, left, target h, w)``;
4. let the subclass turn the batch into conditioning (:meth:`UNetDiffusionRecipe.condition`), run the
   prepared model, and take the MSE against the noise (``epsilon``) or velocity (``v_prediction``),
   weighted per pixel by the sample's loss mask when the data has one (:func:`weighted_mse`).

Every random draw uses the generator passed in, in a fixed order, on the CPU: the same run gives the
same numbers on any device, and a resumed run continues the exact sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IdcraftError
from ..models import load_base_pipeline
from .checkpointing import enable_gradient_checkpointing
from .recipe import TrainingRecipe


def draw_drops(
    count: int, rates: tuple[float, float, float], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(drop_image, drop_text)`` boolean masks: three exclusive events per sample, from one uniform draw."""
    p_image, p_text, p_both = rates
    u = torch.rand(count, generator=generator)
    image_only = u < p_image
    text_only = (u >= p_image) & (u < p_image + p_text)
    both = (u >= p_image + p_text) & (u < p_image + p_text + p_both)
    return image_only | both, text_only | both


def latent_weights(batch: dict, size: tuple[int, int]) -> torch.Tensor | None:
    """The batch's loss masks (``[B, 1, H, W]`` pixel weights in ``[0, 1]``) area-averaged onto the latent
    grid, or None when the data has no masks."""
    mask = batch.get("loss_mask")
    return None if mask is None else F.interpolate(mask.float(), size=size, mode="area")


def weighted_mse(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error; with ``weights`` (broadcastable to ``prediction``) each element's error counts
    with its weight, divided by the total weight -- so all-ones weights give exactly the plain MSE and
    scaling every weight changes nothing: only where the weight lies matters."""
    if weights is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    error = (prediction.float() - target.float()).square()
    weights = weights.to(error.device, error.dtype).expand_as(error)
    return (error * weights).sum() / weights.sum().clamp_min(1e-8)


@dataclass
class DiffusionInputs:
    """One batch's noised training inputs (:meth:`UNetDiffusionRecipe.diffusion_inputs`)."""

    drop_image: torch.Tensor  # [B] bool: the sample trains without its reference
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    text: torch.Tensor
    added: dict | None  # SDXL's pooled text and time ids


class UNetDiffusionRecipe(TrainingRecipe):
    """Loads and freezes an SD1.x/SDXL pipeline and implements the denoising loss around a subclass's
    conditioning. Subclasses build the trainable modules and :meth:`condition`."""

    pipe = None
    device: torch.device
    weight_dtype: torch.dtype

    # ------------------------------------------------------------------ base model
    def load_base(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        from diffusers import DDPMScheduler

        self.device, self.weight_dtype = device, weight_dtype
        pipe = load_base_pipeline(self.config.base, device=device, dtype=weight_dtype)
        pipe.set_progress_bar_config(disable=True)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        if weight_dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.to(torch.float32)  # SDXL's VAE overflows in float16 (the official script keeps it fp32)
        self.pipe = pipe
        self.is_sdxl = hasattr(pipe, "text_encoder_2")
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        prediction = self.noise_scheduler.config.prediction_type
        if prediction not in ("epsilon", "v_prediction"):
            raise IdcraftError(
                f"the base scheduler predicts {prediction!r}; training supports epsilon and v_prediction."
            )
        if self.config.gradient_checkpointing:
            enable_gradient_checkpointing(pipe.unet)

    @property
    def unet(self) -> nn.Module:
        return self.pipe.unet

    @property
    def resolution(self) -> int:
        if self.config.resolution:
            return self.config.resolution
        return int(self.unet.config.sample_size) * int(self.pipe.vae_scale_factor)  # 512 SD1.5, 1024 SDXL

    def base_modules(self) -> dict[str, nn.Module]:
        names = ("unet", "vae", "text_encoder", "text_encoder_2")
        return {n: getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None}

    # ------------------------------------------------------------------ pieces of the objective
    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.pipe.vae
        posterior = vae.encode(pixels.to(self.device, dtype=vae.dtype)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(
            self.device, dtype=posterior.mean.dtype
        )
        latents = posterior.mean + posterior.std * noise  # = latent_dist.sample(), with our generator on CPU
        return (latents * vae.config.scaling_factor).to(self.weight_dtype)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.pipe.encode_prompt(
            prompt=captions, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        if self.is_sdxl:
            return out[0].to(self.weight_dtype), out[2].to(self.weight_dtype)
        return out[0].to(self.weight_dtype), None

    def added_conditions(self, batch: dict, pooled: torch.Tensor | None) -> dict | None:
        if not self.is_sdxl:
            return None
        size = self.resolution
        target = torch.tensor([[size, size]]).expand(len(batch["caption"]), 2)
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], target], dim=1)
        return {"text_embeds": pooled, "time_ids": time_ids.to(self.device, dtype=self.weight_dtype)}

    def condition(self, batch: dict, drop_image: torch.Tensor) -> torch.Tensor:
        """The subclass's image conditioning for ``batch``, with ``drop_image`` samples unconditional."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the loss
    def diffusion_inputs(self, batch: dict, generator: torch.Generator) -> DiffusionInputs:
        """Steps 1-3 of the module docstring: drops, noised latents, text and added conditions, drawn from
        ``generator`` in a fixed order."""
        config = self.config
        count = len(batch["caption"])
        drop_image, drop_text = draw_drops(
            count, (config.drop_image, config.drop_text, config.drop_both), generator
        )
        dropped = drop_text.tolist()
        captions = ["" if drop else text for text, drop in zip(batch["caption"], dropped, strict=True)]

        latents = self.encode_latents(batch["pixels"], generator)
        noise = torch.randn(latents.shape, generator=generator)
        if config.noise_offset:
            noise = noise + config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        noise = noise.to(self.device, dtype=latents.dtype)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (count,), generator=generator
        )
        timesteps = timesteps.to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        text, pooled = self.encode_text(captions)
        return DiffusionInputs(
            drop_image, latents, noise, timesteps, noisy, text, self.added_conditions(batch, pooled)
        )

    def prediction_loss(self, prediction: torch.Tensor, inputs: DiffusionInputs, batch: dict) -> torch.Tensor:
        """Step 4's MSE against the noise or velocity, weighted by the batch's loss masks."""
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(inputs.latents, inputs.noise, inputs.timesteps)
        else:
            target = inputs.noise
        return weighted_mse(prediction, target, latent_weights(batch, inputs.latents.shape[-2:]))

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        inputs = self.diffusion_inputs(batch, generator)
        image = self.condition(batch, inputs.drop_image)
        prediction = model(inputs.noisy, inputs.timesteps, inputs.text, image, inputs.added)
        return self.prediction_loss(prediction, inputs, batch)
