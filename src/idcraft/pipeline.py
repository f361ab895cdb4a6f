"""Generation: reference images + prompt -> images, on a diffusers SD1.5 / SDXL pipeline.

The algorithm, top to bottom (:meth:`IPAdapterPipeline.__call__`):

1. encode the reference images with the CLIP image encoder (pooled embedding or penultimate hidden
   states, by method) and build the unconditional branch the way the official code does;
2. project both into image tokens; several references contribute their tokens side by side;
3. encode the prompt and negative prompt with the base pipeline's own text encoder(s);
4. append the image tokens to the text embeddings (negative image tokens to the negative text);
5. run the unchanged diffusers pipeline, whose cross-attention layers now carry the adapter's
   decoupled-attention processors (see :mod:`idcraft.injection`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .adapter import IPAdapter
from .encoders import ClipImageEncoder
from .images import ImageInput, load_image
from .models import load_base_pipeline, load_controlnet, load_image_encoder, resolve_device, resolve_dtype


@dataclass
class ReferenceTokens:
    """Image tokens of the references and of the unconditional branch, each ``[1, N*T, D]``."""

    cond: torch.Tensor
    uncond: torch.Tensor


class IPAdapterPipeline:
    """A base diffusers pipeline, an image encoder and an :class:`IPAdapter`, wired together.

    Build it with :meth:`from_pretrained` (paths or hub ids) or from objects you already hold.
    """

    def __init__(self, pipe, adapter: IPAdapter, encoder: ClipImageEncoder, controlnet=None):
        self.encoder = encoder
        self.adapter = adapter.to(device=pipe.device, dtype=pipe.unet.dtype).eval()
        adapter.check_compatible(pipe.unet, encoder.config)
        if controlnet is not None:
            pipe = _controlnet_pipeline(pipe, controlnet)
        self.pipe = pipe
        self.is_sdxl = hasattr(pipe, "text_encoder_2")
        controlnets = getattr(controlnet, "nets", [controlnet] if controlnet is not None else [])
        self.adapter.attach(pipe.unet, controlnets)

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        adapter: str | os.PathLike,
        image_encoder: str | os.PathLike,
        *,
        method: str | None = None,
        controlnet: str | os.PathLike | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> IPAdapterPipeline:
        """Load everything, checking the adapter against the base model and encoder before returning."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        ip_adapter = IPAdapter.from_checkpoint(str(adapter), method=method)
        encoder = ClipImageEncoder(load_image_encoder(image_encoder, device=dev, dtype=dt))
        names = {"base_name": f"base model {base}", "encoder_name": f"image encoder {image_encoder}"}
        if _is_local_dir(base):  # fail in milliseconds, before loading gigabytes
            ip_adapter.check_compatible(_meta_unet(base), encoder.config, **names)
        pipe = load_base_pipeline(base, device=dev, dtype=dt)
        ip_adapter.check_compatible(pipe.unet, encoder.config, **names)
        cn = load_controlnet(controlnet, device=dev, dtype=dt) if controlnet else None
        return cls(pipe, ip_adapter, encoder, controlnet=cn)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @torch.no_grad()
    def encode_references(self, references: Sequence[ImageInput]) -> ReferenceTokens:
        """Reference images -> image tokens. N references give ``N * tokens_per_image`` tokens: each image
        keeps its own tokens and the cross-attention attends over all of them at once (the same as
        diffusers does for a list of images given to one adapter). One reference reproduces the official
        implementation exactly."""
        if not references:
            raise ValueError("at least one reference image is needed")
        images = [load_image(r) for r in references]
        method = self.adapter.method
        cond, uncond = self.encoder.encode(images, method.feature, method.uncond)
        dtype = next(self.adapter.image_proj.parameters()).dtype
        tokens = self.adapter.project(cond.to(dtype))
        uncond_tokens = self.adapter.project(uncond.to(dtype))
        return ReferenceTokens(_side_by_side(tokens), _side_by_side(uncond_tokens))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        reference: ImageInput | Sequence[ImageInput] | None = None,
        *,
        tokens: ReferenceTokens | None = None,
        negative_prompt: str = "",
        scale: float = 1.0,
        seed: int | None = None,
        steps: int = 30,
        guidance: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        control_image: ImageInput | None = None,
        controlnet_scale: float = 1.0,
        progress: bool = True,
    ) -> list[Image.Image]:
        """Generate ``num_images`` images of ``reference`` (one or several images, or precomputed ``tokens``)
        following ``prompt``. ``seed`` seeds ``torch.Generator("cpu")``, so a seed gives the same initial
        latents as diffusers and the official code."""
        if tokens is None:
            if reference is None:
                raise ValueError("give reference images or precomputed tokens")
            refs = [reference] if isinstance(reference, (str, os.PathLike, Image.Image)) else list(reference)
            tokens = self.encode_references(refs)
        self.adapter.set_scale(scale)
        self.adapter.layout.num_tokens = tokens.cond.shape[1]

        text = self.pipe.encode_prompt(
            prompt=prompt,
            device=self.device,
            num_images_per_prompt=num_images,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt,
        )
        embeds = {"prompt_embeds": text[0], "negative_prompt_embeds": text[1]}
        if self.is_sdxl:
            embeds.update(pooled_prompt_embeds=text[2], negative_pooled_prompt_embeds=text[3])
        embeds["prompt_embeds"] = _append(embeds["prompt_embeds"], tokens.cond, num_images)
        embeds["negative_prompt_embeds"] = _append(embeds["negative_prompt_embeds"], tokens.uncond, num_images)

        extra = {}
        if hasattr(self.pipe, "controlnet"):
            if control_image is None:
                raise ValueError("this pipeline has a ControlNet: give control_image")
            extra = {"image": load_image(control_image), "controlnet_conditioning_scale": controlnet_scale}
        self.pipe.set_progress_bar_config(disable=not progress)
        generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
        return self.pipe(
            **embeds,
            guidance_scale=guidance,
            num_inference_steps=steps,
            generator=generator,
            width=width,
            height=height,
            **extra,
        ).images


def _side_by_side(tokens: torch.Tensor) -> torch.Tensor:
    """``[N, T, D]`` -> ``[1, N*T, D]``."""
    return tokens.reshape(1, -1, tokens.shape[-1])


def _append(text: torch.Tensor, image_tokens: torch.Tensor, num_images: int) -> torch.Tensor:
    image_tokens = image_tokens.to(device=text.device, dtype=text.dtype).repeat(num_images, 1, 1)
    return torch.cat([text, image_tokens], dim=1)


def _controlnet_pipeline(pipe, controlnet):
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    cls = StableDiffusionXLControlNetPipeline if hasattr(pipe, "text_encoder_2") else StableDiffusionControlNetPipeline
    return cls.from_pipe(pipe, controlnet=controlnet)


def _is_local_dir(path) -> bool:
    return os.path.isdir(os.path.join(str(path), "unet"))


def _meta_unet(base):
    """The base UNet built on the meta device: its structure and widths without reading its weights."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(os.path.join(str(base), "unet"))
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)
