"""Training recipe for the IP-Adapter family (IP-Adapter, Plus, Plus-Face, Full-face) on SD1.x / SDXL.

What trains is exactly what the official scripts train: the projection (``image_proj``) and every
cross-attention layer's ``to_k_ip`` / ``to_v_ip``, the latter starting as copies of the layer's text
``to_k`` / ``to_v`` (:meth:`IPAdapter.for_unet`). The base model and CLIP image encoder are frozen.

A dropped image is represented as the method's registry rule says, as in the official scripts: zero
pooled embeddings (``zero-embeds``: IP-Adapter) or the encoder's features of an all-zero normalised pixel
tensor (``zero-image``: Plus, Plus-Face, Full-face). Both are one fixed tensor, computed once here.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..adapter import IPAdapter
from ..checkpoints import save_checkpoint
from ..encoders import ClipImageEncoder
from ..errors import IdcraftError
from ..models import load_image_encoder
from ..registry import get_method
from .diffusion import UNetDiffusionRecipe
from .recipe import register_recipe


class AdapterDenoiser(nn.Module):
    """UNet + adapter as one module, so ``accelerate.prepare`` (DDP) wraps the forward that uses the
    adapter's parameters. Image tokens are appended to the text tokens, as at inference."""

    def __init__(self, unet: nn.Module, adapter: IPAdapter):
        super().__init__()
        self.unet = unet
        self.adapter = adapter

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        features: torch.Tensor,
        added: dict | None = None,
    ) -> torch.Tensor:
        tokens = self.adapter.project(features.to(next(self.adapter.image_proj.parameters()).dtype))
        self.adapter.layout.num_tokens = tokens.shape[1]
        hidden = torch.cat([text, tokens.to(text.dtype)], dim=1)
        return self.unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


class ClipPreprocess:
    """Reference image -> ``{"clip_pixels": [3, 224, 224]}`` with the official CLIP preprocessing
    (picklable, for DataLoader workers)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return {"clip_pixels": self.processor(images=[image], return_tensors="pt").pixel_values[0]}


@register_recipe
class IPAdapterRecipe(UNetDiffusionRecipe):
    """IP-Adapter family: CLIP image features -> projection -> decoupled cross-attention."""

    methods = ("ip-adapter", "ip-adapter-plus", "ip-adapter-plus-face", "ip-adapter-full-face")

    def build(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.method = get_method(self.config.method)
        if not self.config.image_encoder:
            raise IdcraftError(
                f"{self.method.name} training needs --image-encoder: the CLIP image encoder folder "
                "the adapter will be used with (e.g. models/image_encoder of h94/IP-Adapter)."
            )
        self.encoder = ClipImageEncoder(
            load_image_encoder(self.config.image_encoder, device=device, dtype=weight_dtype)
        )
        self.load_base(device, weight_dtype)
        cfg = self.encoder.config
        width = cfg.projection_dim if self.method.feature == "pooled" else cfg.hidden_size
        adapter = IPAdapter.for_unet(self.unet, self.method, width, num_tokens=self.config.num_tokens)
        adapter.to(device=device, dtype=torch.float32).requires_grad_(True).train()
        adapter.attach(self.unet)
        self.adapter = adapter
        self.model = AdapterDenoiser(self.unet, adapter)
        self.null_features = self._null_features()

    @torch.no_grad()
    def _null_features(self) -> torch.Tensor:
        """Features standing for a dropped image: ``[1, ...]``, computed once."""
        size = self.encoder.processor.crop_size
        blank = self.encoder.preprocess([Image.new("RGB", (size["width"], size["height"]))])
        features = self.encoder.features(torch.zeros_like(blank), self.method.feature)
        return torch.zeros_like(features) if self.method.uncond == "zero-embeds" else features

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter.parameters())

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {**self.base_modules(), "image_encoder": self.encoder.model}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.adapter.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.adapter.load_state_dict(state, strict=True)

    # ------------------------------------------------------------------ data
    def reference_preprocessor(self) -> ClipPreprocess:
        return ClipPreprocess(self.encoder.processor)

    @torch.no_grad()
    def encode_references(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        pixels = inputs["clip_pixels"].to(self.device, dtype=self.encoder.dtype)
        return self.encoder.features(pixels, self.method.feature)

    def cache_fingerprint(self) -> dict:
        return {
            "recipe": "ip-adapter",
            "feature": self.method.feature,
            "image_encoder": str(self.config.image_encoder),
            "dtype": str(self.encoder.dtype),
            "encoder_config": repr(self.encoder.config.to_dict()),
        }

    def condition(self, batch: dict, drop_image: torch.Tensor) -> torch.Tensor:
        features = batch["features"].to(self.device) if "features" in batch else self.encode_references(batch)
        null = self.null_features.to(features.dtype).expand_as(features)
        mask = drop_image.to(self.device).view(-1, *([1] * (features.dim() - 1)))
        return torch.where(mask, null, features)

    # ------------------------------------------------------------------ results
    def export(self, directory: Path, formats: Sequence[str], metadata: dict[str, str]) -> list[Path]:
        checkpoint = self.adapter.to_checkpoint()
        checkpoint.metadata = {"method": self.method.name, **metadata}
        suffixes = {"safetensors": ".safetensors", "bin": ".bin"}
        return [save_checkpoint(checkpoint, Path(directory) / f"adapter{suffixes[f]}") for f in formats]

    @torch.no_grad()
    def sample(
        self, prompt: str, reference: str, *, seed: int, steps: int, guidance: float
    ) -> list[Image.Image]:
        """Generate with a copy of the adapter through :class:`IPAdapterPipeline`: the pipeline casts and
        attaches its adapter, which must not happen to the trained one; detaching the copy puts the
        trained processors back."""
        return preview_images(
            self.adapter,
            self.pipe,
            prompt,
            reference,
            self.resolution,
            encoder=self.encoder,
            seed=seed,
            steps=steps,
            guidance=guidance,
        )


def preview_images(
    adapter: IPAdapter,
    pipe,
    prompt: str,
    reference: str,
    resolution: int,
    *,
    seed: int,
    steps: int,
    guidance: float,
    encoder=None,
    controlnet=None,
    face_backend: str = "insightface",
    face_models: str | None = None,
) -> list[Image.Image]:
    """Sample images from the adapter being trained, through :class:`~idcraft.pipeline.IPAdapterPipeline`.

    The pipeline casts and attaches the adapter (and ControlNet) it is given, which must not happen to
    the trained modules: it gets copies, and detaching the copy puts the trained processors back.
    """
    from ..pipeline import IPAdapterPipeline

    preview = IPAdapter.from_checkpoint(adapter.to_checkpoint(), method=adapter.method.name)
    if controlnet is not None:
        controlnet = copy.deepcopy(controlnet).to(dtype=pipe.unet.dtype).eval()
    pipeline = IPAdapterPipeline(pipe, preview, encoder, controlnet=controlnet)
    try:
        face = {"face_backend": face_backend, "face_models": face_models} if adapter.method.needs_face else {}
        tokens = pipeline.encode_references([reference], **face)
        return pipeline(
            prompt,
            tokens=tokens,
            seed=seed,
            steps=steps,
            guidance=guidance,
            width=resolution,
            height=resolution,
            progress=False,
        )
    finally:
        preview.detach()
        adapter.layout.num_tokens = 0
