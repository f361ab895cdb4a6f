"""Training recipe for InstantID: face tokens in the UNet plus IdentityNet, a ControlNet on face keypoints.

What trains is what InstantID publishes: the Resampler reading the raw (unnormalised) ArcFace embedding as
one token (``image_proj``), every cross-attention layer's ``to_k_ip`` / ``to_v_ip`` (starting as copies of
the text ``to_k`` / ``to_v``), and IdentityNet, a diffusers ``ControlNetModel`` initialised from the base
UNet (``ControlNetModel.from_unet``, as ControlNet training starts: encoder copied, zero convolutions zero).

IdentityNet is wired exactly as at inference (:meth:`idcraft.adapter.IPAdapter.attach`): its condition is
InstantID's keypoint image (:func:`idcraft.faces.draw_kps`) of the target's face, drawn in the training
crop at the training resolution, and its cross-attention context is the face tokens instead of the text.
A dropped image (classifier-free guidance) is a zero embedding; the keypoint image is always given.

The run folder holds ``adapter.safetensors`` (official layout: ``ip-adapter.bin`` of InstantX/InstantID)
and ``ControlNetModel/`` (``save_pretrained``), so ``idcraft generate --method instantid --adapter
DIR/adapter.safetensors --controlnet DIR/ControlNetModel`` uses the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..adapter import IPAdapter
from ..registry import FACE_EMBEDDING_DIM, get_method
from .faceid import FacePreprocess, FaceRecipeBase
from .ip_adapter import preview_images
from .recipe import register_recipe

#: ``ControlNetModel``'s default condition-embedding widths (three 2x downsamplings: 8x, SD's VAE factor).
CONDITIONING_CHANNELS = (16, 32, 96, 256)


class IdentityNetDenoiser(nn.Module):
    """UNet + adapter + IdentityNet as one module (for ``accelerate.prepare``). The face tokens are appended
    to the text; IdentityNet's attention processors keep only the face tokens (attached by the adapter)."""

    def __init__(self, unet: nn.Module, adapter: IPAdapter, controlnet: nn.Module):
        super().__init__()
        self.unet = unet
        self.adapter = adapter
        self.controlnet = controlnet

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        condition: dict,
        added: dict | None = None,
    ) -> torch.Tensor:
        proj = self.adapter.image_proj
        embeds = condition["embeds"].to(next(proj.parameters()).dtype)
        tokens = proj(embeds[:, 0])  # one (averaged) raw embedding per sample, as one token
        self.adapter.layout.num_tokens = tokens.shape[1]
        hidden = torch.cat([text, tokens.to(text.dtype)], dim=1)
        dtype = self.controlnet.dtype
        cn_added = None if added is None else {k: v.to(dtype) for k, v in added.items()}
        down, mid = self.controlnet(
            noisy.to(dtype),
            timesteps,
            encoder_hidden_states=hidden.to(dtype),
            controlnet_cond=condition["control"].to(dtype),
            added_cond_kwargs=cn_added,
            return_dict=False,
        )
        return self.unet(
            noisy,
            timesteps,
            encoder_hidden_states=hidden,
            added_cond_kwargs=added,
            down_block_additional_residuals=[d.to(noisy.dtype) for d in down],
            mid_block_additional_residual=mid.to(noisy.dtype),
        ).sample


@register_recipe
class InstantIDRecipe(FaceRecipeBase):
    """InstantID: raw ArcFace embedding -> 16 tokens (Resampler) + IdentityNet on the keypoint image."""

    methods = ("instantid",)

    def build(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        from diffusers import ControlNetModel

        self.method = method = get_method(self.config.method)
        self.load_base(device, weight_dtype)
        adapter = IPAdapter.for_unet(self.unet, method, FACE_EMBEDDING_DIM, num_tokens=self.config.num_tokens)
        adapter.to(device=device, dtype=torch.float32).requires_grad_(True).train()
        # The condition image is at pixel resolution: one 2x downsampling per power of 2 of the VAE factor.
        levels = int(math.log2(self.pipe.vae_scale_factor)) + 1
        controlnet = ControlNetModel.from_unet(
            self.unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS[:levels]
        )
        controlnet.to(device=device, dtype=torch.float32).requires_grad_(True).train()
        if self.config.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        adapter.attach(self.unet, [controlnet])
        self.adapter, self.controlnet = adapter, controlnet
        self.model = IdentityNetDenoiser(self.unet, adapter, controlnet)
        self._load_faces(target_kps=True)

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.adapter.parameters(), *self.controlnet.parameters()]

    def frozen_modules(self) -> dict[str, nn.Module]:
        return self.base_modules()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"adapter.{k}": v.detach() for k, v in self.adapter.state_dict().items()}
        state.update({f"controlnet.{k}": v.detach() for k, v in self.controlnet.state_dict().items()})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, module in (("adapter.", self.adapter), ("controlnet.", self.controlnet)):
            part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            module.load_state_dict(part, strict=True)

    # ------------------------------------------------------------------ data
    def reference_preprocessor(self) -> FacePreprocess:
        return FacePreprocess(self.faces, self.method, self.slots, control=True)

    def encode_references(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return inputs["face_embeds"]  # the embedding is the feature: nothing to encode

    def condition(self, batch: dict, drop_image: torch.Tensor) -> dict:
        return {"embeds": self._embeds(batch, drop_image), "control": batch["control"].to(self.device)}

    # ------------------------------------------------------------------ results
    def export(self, directory: Path, formats: Sequence[str], metadata: dict[str, str]) -> list[Path]:
        files = self._export_adapter(directory, formats, metadata)
        folder = Path(directory) / "ControlNetModel"
        self.controlnet.save_pretrained(folder)
        return [*files, folder]

    @torch.no_grad()
    def sample(
        self, prompt: str, reference: str, *, seed: int, steps: int, guidance: float
    ) -> list[Image.Image]:
        """Generate with copies of the adapter and IdentityNet through :class:`IPAdapterPipeline` (which
        casts and attaches what it is given; the trained modules must keep their processors and dtype).
        The reference's identity and keypoints come from the run's face backend."""
        return preview_images(
            self.adapter,
            self.pipe,
            prompt,
            reference,
            self.resolution,
            controlnet=self.controlnet,
            seed=seed,
            steps=steps,
            guidance=guidance,
            face_backend=self.config.face_backend,
            face_models=self.config.face_models,
        )
