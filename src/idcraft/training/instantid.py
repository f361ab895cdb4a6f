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
and ``ControlNetModel/`` (diffusers layout: ``config.json`` + ``diffusion_pytorch_model.safetensors``), so
``idcraft generate --method instantid --adapter DIR/adapter.safetensors --controlnet DIR/ControlNetModel``
uses the result. Both are written in ``--export-dtype`` (the official release is float16).

Fine-tuning a released InstantID starts from its files: ``--init-from ip-adapter.bin`` for the Resampler and
key/value weights, ``--init-controlnet ControlNetModel/`` for IdentityNet (each checked against the base:
an IdentityNet made for another UNet is refused, naming the first tensors that differ).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..adapter import IPAdapter
from ..errors import IdcraftError
from ..registry import FACE_EMBEDDING_DIM, get_method
from .checkpointing import enable_gradient_checkpointing
from .faceid import FacePreprocess, FaceRecipeBase
from .ip_adapter import adapter_from_file, preview_images
from .recipe import export_tensors, register_adapter, register_recipe

#: ``ControlNetModel``'s default condition-embedding widths (three 2x downsamplings: 8x, SD's VAE factor).
CONDITIONING_CHANNELS = (16, 32, 96, 256)


class IdentityNetDenoiser(nn.Module):
    """UNet + adapter + IdentityNet as one module (for ``accelerate.prepare``). The face tokens are appended
    to the text; IdentityNet's attention processors keep only the face tokens (attached by the adapter)."""

    def __init__(self, unet: nn.Module, adapter: IPAdapter, controlnet: nn.Module):
        super().__init__()
        self.unet = unet
        register_adapter(self, adapter, "image_proj")  # its attention processors are in the denoiser
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
        if self.config.init_from:
            adapter = adapter_from_file(self.config, method, self.unet, embed_dim=FACE_EMBEDDING_DIM)
        else:
            adapter = IPAdapter.for_unet(
                self.unet, method, FACE_EMBEDDING_DIM, num_tokens=self.config.num_tokens
            )
        adapter.to(device=device, dtype=torch.float32).requires_grad_(True).train()
        # The condition image is at pixel resolution: one 2x downsampling per power of 2 of the VAE factor.
        levels = int(math.log2(self.pipe.vae_scale_factor)) + 1
        controlnet = ControlNetModel.from_unet(
            self.unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS[:levels]
        )
        if self.config.init_controlnet:
            load_identitynet(controlnet, self.config.init_controlnet, self.config.base)
        controlnet.to(device=device, dtype=torch.float32).requires_grad_(True).train()
        if self.config.gradient_checkpointing:
            enable_gradient_checkpointing(controlnet)
        adapter.attach(self.unet, [controlnet])
        self.adapter, self.controlnet = adapter, controlnet
        self.model = IdentityNetDenoiser(self.unet, adapter, controlnet)
        self._load_faces(target_kps=True)

    # ------------------------------------------------------------------ parameters
    def trained_modules(self) -> dict[str, nn.Module]:
        return {"adapter": self.adapter, "controlnet": self.controlnet}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return self.base_modules()

    # ------------------------------------------------------------------ data
    def reference_preprocessor(self) -> FacePreprocess:
        return FacePreprocess(self.faces, self.method, self.slots, control=True)

    def encode_references(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return inputs["face_embeds"]  # the embedding is the feature: nothing to encode

    def condition(self, batch: dict, drop_image: torch.Tensor) -> dict:
        return {"embeds": self._embeds(batch, drop_image), "control": batch["control"].to(self.device)}

    # ------------------------------------------------------------------ results
    def export(
        self,
        directory: Path,
        formats: Sequence[str],
        metadata: dict[str, str],
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> list[Path]:
        state = self.trainable_state_dict() if state is None else state
        parts = {
            prefix: {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            for prefix in ("adapter.", "controlnet.")
        }
        files = self._export_adapter(directory, formats, metadata, parts["adapter."])
        folder = Path(directory) / "ControlNetModel"
        save_controlnet(self.controlnet, parts["controlnet."], folder, self.config.export_dtype)
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


def load_identitynet(controlnet: nn.Module, folder: str, base: str) -> None:
    """``--init-controlnet``: copy a saved IdentityNet (diffusers ControlNet folder) into ``controlnet``, the
    one built for this base, refusing one made for another UNet (different tensors or shapes) by name."""
    from diffusers import ControlNetModel

    try:
        loaded = ControlNetModel.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as exc:
        raise IdcraftError(f"--init-controlnet {folder}: cannot load a ControlNet from it ({exc}).") from exc
    mine, theirs = controlnet.state_dict(), loaded.state_dict()
    missing = sorted(set(mine) - set(theirs))
    extra = sorted(set(theirs) - set(mine))
    shapes = [k for k in mine if k in theirs and mine[k].shape != theirs[k].shape]
    if missing or extra or shapes:
        details = []
        if shapes:
            k = shapes[0]
            details.append(
                f"{len(shapes)} tensor(s) of other shapes, e.g. {k} {tuple(theirs[k].shape)} where this base "
                f"needs {tuple(mine[k].shape)}"
            )
        if missing:
            details.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
        if extra:
            details.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}")
        raise IdcraftError(
            f"--init-controlnet {folder} is not an IdentityNet for base model {base}: "
            + "; ".join(details)
            + "."
        )
    controlnet.load_state_dict(theirs, strict=True)


def save_controlnet(
    controlnet: nn.Module, state: Mapping[str, torch.Tensor], folder: Path, dtype: str
) -> None:
    """Write ``state`` (the ControlNet's tensors) as a diffusers model folder in ``dtype``: what
    ``save_pretrained`` writes, from given tensors (under FSDP/DeepSpeed the live module holds shards)."""
    from ..outputs import save_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    controlnet.save_config(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_safetensors(export_tensors(state, dtype), str(tmp), metadata={"format": "pt"})
    tmp.replace(weights)
