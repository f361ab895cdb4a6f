"""Training recipe for PuLID v1.1 on a frozen SDXL base: the noise-prediction loss plus PuLID's alignment loss.

What trains: the IDFormer (release group ``id_adapter.*``) and the ID attention beside every cross-attention
layer (``id_adapter_attn_layers.{k}.id_to_k|id_to_v``). Frozen: the UNet, the VAE, both text encoders, the
EVA02-CLIP tower (``--image-encoder``: the eva_clip checkpoint) and BiSeNet (``--image-encoder-2``: facexlib's
``parsing_bisenet.pth``). Data and the alignment loss are PuLID's (:mod:`idcraft.training.pulid_faces`).

Objective, per batch:

1. the noise-prediction loss of the other UNet recipes (:class:`~idcraft.training.diffusion.UNetDiffusionRecipe`:
   the same drops, latents, noise, timesteps, SDXL text and time ids), the UNet run with the sample's ID
   tokens in the ID attention -- or, for a sample whose reference is dropped, the unconditional tokens
   (the IDFormer of zeros), which is what the negative CFG branch gives the UNet at inference;
2. the alignment loss at every cross-attention layer: ``K`` is the layer's keys of the prompt, ``Q_id`` /
   ``Q`` its output with / without the identity (the second UNet pass runs without ID attention and
   without gradient); only samples that keep their reference count;
3. with ``--id-loss WEIGHT``, PuLID's accurate-ID loss: a few-step sampling path from pure noise with the
   ID tokens, decoded, its face aligned and embedded with ArcFace (:mod:`idcraft.training.pulid_idloss`).

The ID attention runs with the settings generation uses by default (ID scale 0.8, 20 zero tokens, ortho v2),
so the trained weights fit the way they are used; ``extra`` ``id_scale``, ``num_zero``, ``ortho`` change that.
A fresh ID attention layer whose input width equals the UNet's text width starts from the layer's own text
``to_k`` / ``to_v`` (as IP-Adapter's official training does); ``--init-from`` starts from a release file.

The result is ``OUTPUT/adapter.safetensors`` in the release layout of ``pulid_v1.1.safetensors``, which
``idcraft generate --method pulid`` loads.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..errors import CheckpointError, IdcraftError
from .checkpointing import enable_gradient_checkpointing
from .diffusion import UNetDiffusionRecipe
from .pulid_faces import FACE_SETTINGS, PulidFaceInputs, alignment_losses
from .pulid_idloss import ID_LOSS_SETTINGS, FastPath, IdentityLoss, sample_latents
from .recipe import engine_preview, export_tensors, register_adapter, register_recipe, write_flat_release

log = logging.getLogger(__name__)

SETTINGS = ("id_scale", "num_zero", "ortho", *FACE_SETTINGS, *ID_LOSS_SETTINGS)


class PulidAdapter(nn.Module):
    """The IDFormer and the ID attention under the release's group names, so that ``state_dict()`` is
    ``pulid_v1.1.safetensors``' layout key for key. ``attention`` (an
    :class:`~idcraft.pulid.sdxl.IDAttention`) is kept as a plain attribute: its layers are registered here
    once, as ``id_adapter_attn_layers``."""

    def __init__(self, idformer: nn.Module, attention):
        super().__init__()
        self.id_adapter = idformer
        self.id_adapter_attn_layers = attention.layers
        object.__setattr__(self, "attention", attention)


class PulidDenoiser(nn.Module):
    """SDXL UNet + IDFormer as one module (what ``accelerate.prepare`` wraps; the ID attention layers are the
    UNet's processors): ID tokens with gradient, the prediction with them, and the alignment features."""

    def __init__(self, unet: nn.Module, adapter: PulidAdapter, call_settings: dict):
        super().__init__()
        self.unet = unet
        register_adapter(self, adapter, "id_adapter")
        self.call_settings = call_settings
        self._captured: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        self._capturing = False
        self._keys = False
        from ..injection import attention_module, cross_attention_layers

        for name in cross_attention_layers(unet).values():
            attention_module(unet, name).register_forward_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        if not self._capturing:
            return
        keys = None
        if self._keys:
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            keys = module.to_k(context)
        self._captured.append((keys, output))

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        added: dict | None,
        id_cond: torch.Tensor,
        hidden: list[torch.Tensor],
        keep: torch.Tensor,
        align: bool,
        fast: FastPath | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(prediction, semantic alignment loss, layout alignment loss, generated latents)``; the
        alignment terms are 0 when ``align`` is false; the latents are the ``x0`` of the accurate-ID loss's
        fast path for ``fast.index``'s samples, run with their ID tokens (None without ``fast``)."""
        from ..pulid.sdxl import IdCall, id_call

        idformer = self.adapter.id_adapter
        dtype = idformer.latents.dtype
        id_cond, hidden = id_cond.to(dtype), [h.to(dtype) for h in hidden]
        tokens = idformer(id_cond, hidden)
        if not bool(keep.all()):  # the IDFormer of zeros: the same tokens for every sample, made once
            uncond = idformer.uncond_tokens(id_cond[:1], [h[:1] for h in hidden])
            tokens = torch.where(keep.view(-1, 1, 1).to(tokens.device), tokens, uncond)
        inputs = dict(encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)
        self._captured, self._capturing, self._keys = [], align, False
        without = []
        try:
            with id_call(IdCall(tokens, **self.call_settings)):
                prediction = self.unet(noisy, timesteps, **inputs)[0]
            with_id, self._captured = self._captured, []
            if align:
                self._keys = True
                with torch.no_grad():
                    self.unet(noisy, timesteps, **inputs)  # no id_call: plain attention, the base model
                without = self._captured
        finally:
            self._captured, self._capturing, self._keys = [], False, False
        generated = None if fast is None else self._fast_path(tokens, fast)
        zero = prediction.new_zeros((), dtype=torch.float32)
        if not align:
            return prediction, zero, zero, generated
        points = [(keys, q_id, q) for (_, q_id), (keys, q) in zip(with_id, without, strict=True)]
        sem, layout = alignment_losses(points, keep.to(prediction.device))
        return prediction, sem, layout, generated

    def _fast_path(self, tokens: torch.Tensor, fast: FastPath) -> torch.Tensor:
        """The accurate-ID loss's sampling path (:mod:`idcraft.training.pulid_idloss`) with the selected
        samples' ID tokens, with gradient."""
        from ..pulid.sdxl import IdCall, id_call

        call = IdCall(tokens[fast.index.to(tokens.device)], **self.call_settings)
        dtype = self.unet.dtype

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with id_call(call):
                out = self.unet(x.to(dtype), t, encoder_hidden_states=fast.text, added_cond_kwargs=fast.added)
                return out.sample

        return sample_latents(denoise, fast)


@register_recipe
class PulidRecipe(PulidFaceInputs, UNetDiffusionRecipe):
    """PuLID v1.1 on SDXL (see the module docstring)."""

    methods = ("pulid",)
    method_name = "pulid"
    identity: IdentityLoss | None = None  # the accurate-ID loss's frozen parts (``--id-loss``)

    # ------------------------------------------------------------------ modules
    def build(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        from ..flux_base import is_flux_base
        from ..methods.pulid import FAMILY
        from ..models import base_kind
        from ..pulid.sdxl import IdCall

        config = self.config
        self.check_extra(SETTINGS)
        if is_flux_base(config.base):
            raise IdcraftError(
                f"pulid trains on SDXL; base model {config.base} is FLUX.1: use --method pulid-flux."
            )
        kind, name = base_kind(config.base)
        if kind != "sdxl":
            raise IdcraftError(f"pulid (v1.1) trains on SDXL; base model {config.base} is a {name}.")
        extra = config.extra
        settings = dict(
            scale=float(extra.get("id_scale", FAMILY.defaults["scale"])),
            num_zero=int(extra.get("num_zero", FAMILY.defaults["num_zero"])),
            ortho=str(extra.get("ortho", FAMILY.defaults["ortho"])),
        )
        IdCall(None, **settings)  # checks ortho and num_zero before anything loads
        self.identity = IdentityLoss.load(config, device) if config.id_loss else None
        self.load_face_models(device, weight_dtype)
        self.load_base(device, weight_dtype)
        if self.identity is not None and config.gradient_checkpointing:
            enable_gradient_checkpointing(self.pipe.vae)  # the ID loss decodes with gradient
        adapter = self._adapter()
        adapter.to(device=device, dtype=torch.float32).requires_grad_(True).train()
        adapter.attention.attach(self.unet)
        self.adapter = adapter
        self.idformer = adapter.id_adapter
        self.model = PulidDenoiser(self.unet, adapter, settings)

    def _adapter(self) -> PulidAdapter:
        from ..pulid.idformer import IDFormer
        from ..pulid.pipeline import IDFORMER_PREFIX, check_eva, is_pulid_sdxl, read_release
        from ..pulid.sdxl import IDAttention

        config = self.config
        if config.init_from:
            release = read_release(config.init_from)
            if not is_pulid_sdxl(release):
                raise IdcraftError(
                    f"--init-from {config.init_from}: not a PuLID SDXL release (no id_adapter.* + "
                    "id_adapter_attn_layers.* tensors)."
                )
            try:
                idformer = IDFormer.from_state_dict(release, prefix=IDFORMER_PREFIX)
                check_eva(idformer, self.face_encoder.eva, config.image_encoder)
                attention = IDAttention.from_release(self.unet, release)
            except CheckpointError as exc:
                raise IdcraftError(
                    f"--init-from {config.init_from} cannot train on this run's models: {exc}"
                ) from exc
            return PulidAdapter(idformer.float(), attention.float())
        idformer = IDFormer(**self.idformer_settings())
        attention = IDAttention(self.unet, idformer.config.output_dim)
        from ..injection import attention_module, cross_attention_layers

        names = cross_attention_layers(self.unet)
        for index, layer in attention.layers.items():
            attn = attention_module(self.unet, names[int(index)])
            if attn.to_k.in_features == attention.id_dim:  # start from the text projections, as IP-Adapter
                layer.id_to_k.weight.data.copy_(attn.to_k.weight.float())
                layer.id_to_v.weight.data.copy_(attn.to_v.weight.float())
        return PulidAdapter(idformer, attention)

    def frozen_modules(self) -> dict[str, nn.Module]:
        frozen = {**self.base_modules(), **self.face_modules()}
        if self.identity is not None:
            frozen["arcface"] = self.identity.recogniser
        return frozen

    # ------------------------------------------------------------------ objective
    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        inputs = self.diffusion_inputs(batch, generator)
        id_cond, hidden = self.batch_features(batch)
        keep = ~inputs.drop_image.to(self.device)
        sem_weight, layout_weight = self.align_weights()
        fast = None
        if self.identity is not None:
            noise = torch.randn(inputs.latents.shape, generator=generator)  # always drawn: a fixed order
            fast = self.identity.path(noise, keep, inputs.text, inputs.added, self.noise_scheduler)
        prediction, sem, layout, generated = model(
            inputs.noisy,
            inputs.timesteps,
            inputs.text,
            inputs.added,
            id_cond,
            hidden,
            keep,
            sem_weight > 0 or layout_weight > 0,
            fast,
        )
        loss = self.prediction_loss(prediction, inputs, batch) + sem_weight * sem + layout_weight * layout
        if generated is not None:
            loss = loss + self.identity.weight * self.id_loss(generated, batch["face"][fast.index.cpu()])
        return loss

    def id_loss(self, latents: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """``mean(1 - cos)`` between the faces generated from ``latents`` (decoded with gradient) and the
        references' aligned ``faces``; the counts of faces found are logged at debug level."""
        images = self.decode(latents)
        kps = self.identity.keypoints(images)
        reference = self.identity.reference_embeddings(faces)
        distance, found = self.identity.distance(images, reference, kps)
        log.debug("id loss: a face in %d of %d generated image(s)", found, len(kps))
        return distance

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] through the frozen VAE, differentiable in ``latents``."""
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            latents = latents + shift
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]

    # ------------------------------------------------------------------ results
    def export(
        self,
        directory: Path,
        formats: Sequence[str],
        metadata: dict[str, str],
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> list[Path]:
        """``adapter.safetensors`` (and ``adapter.bin``) in the layout of ``pulid_v1.1.safetensors``."""
        state = self.trainable_state_dict() if state is None else state
        release = export_tensors(state, self.config.export_dtype)
        unknown = [k for k in release if not k.startswith(("id_adapter.", "id_adapter_attn_layers."))]
        if unknown:
            raise IdcraftError(
                f"unexpected trained tensors {unknown[:3]} (not id_adapter.* or id_adapter_attn_layers.*)."
            )
        return write_flat_release(release, directory, formats, {"method": "pulid", **metadata})

    @torch.no_grad()
    def sample(
        self, prompt: str, reference: str, *, seed: int, steps: int, guidance: float
    ) -> list[Image.Image]:
        """Generate through the engine as a user would (the reference's face found with the run's face
        backend, ``--face-models``), with copies of the trained modules in a
        :class:`~idcraft.pulid.pipeline.PulidSDXLPipeline` on the frozen base; the trained ID attention is
        attached again afterwards."""
        from ..pulid.encoder import PulidEncoder
        from ..pulid.pipeline import PulidSDXLPipeline

        unet = self.unet
        dtype = unet.dtype
        encoder = PulidEncoder(
            copy.deepcopy(self.adapter.id_adapter).to(dtype).eval(),
            self.face_encoder.eva,
            self.face_encoder.parser,
        )
        attention = copy.deepcopy(self.adapter.attention).to(dtype)
        try:
            pipeline = PulidSDXLPipeline(self.pipe, encoder, attention)
            return engine_preview(
                self, pipeline, prompt, reference, seed=seed, steps=steps, guidance=guidance
            )
        finally:
            self.adapter.attention.attach(unet)
