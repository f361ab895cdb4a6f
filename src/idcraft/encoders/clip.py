"""CLIP image encoder, used the way the official IP-Adapter code uses it.

Preprocessing is transformers' default ``CLIPImageProcessor()`` (resize the short side to 224 with bicubic,
centre crop 224, CLIP mean/std) whatever the encoder folder's own preprocessor config says: the official
code and diffusers' ``load_ip_adapter`` both construct it with defaults, and the adapters were trained so.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import CLIPVisionModelWithProjection

from ..registry import Feature, Uncond


def default_image_processor():
    """``CLIPImageProcessor()`` as it resolves in this environment: transformers >= 5 picks its
    torchvision backend when torchvision is installed and the PIL one otherwise (and warns about it);
    the official code gets the same choice, so idcraft makes it the same way, without the warning."""
    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "CLIPImageProcessorPil"):
        return transformers.CLIPImageProcessorPil()
    return transformers.CLIPImageProcessor()


class ClipImageEncoder:
    """Wraps a ``CLIPVisionModelWithProjection`` and the official preprocessing."""

    def __init__(self, model: CLIPVisionModelWithProjection, processor=None):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor or default_image_processor()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> ClipImageEncoder:
        from ..models import load_image_encoder

        return cls(load_image_encoder(path, **kwargs))

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        return pixels.to(self.device, dtype=self.dtype)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor, feature: Feature) -> torch.Tensor:
        """``pooled`` -> ``[N, projection_dim]``; ``penultimate`` -> ``[N, patches+1, hidden_size]``."""
        if feature == "pooled":
            return self.model(pixels).image_embeds
        return self.model(pixels, output_hidden_states=True).hidden_states[-2]

    def encode(
        self, images: Sequence[Image.Image], feature: Feature, uncond: Uncond
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of ``images`` and of the unconditional branch, as the official code builds it."""
        pixels = self.preprocess(images)
        cond = self.features(pixels, feature)
        if uncond == "zero-embeds":
            return cond, torch.zeros_like(cond)
        return cond, self.features(torch.zeros_like(pixels), feature)
