"""Training recipe for PuLID-FLUX on a frozen FLUX.1 base: flow-matching loss plus PuLID's alignment loss.

What trains: the IDFormer (``pulid_encoder``) and the ID cross-attention modules (``pulid_ca``) after every
2nd double and 4th single block. Frozen: the FLUX transformer, the VAE, both text encoders, the EVA02-CLIP
tower (``--image-encoder``: the eva_clip checkpoint) and BiSeNet (``--image-encoder-2``: facexlib's
``parsing_bisenet.pth``).

Data and the alignment loss are PuLID's (:mod:`idcraft.training.pulid_faces`); per batch, the
flow-matching loss of the InstantCharacter recipe (same latents, noise levels, packing, text, FLUX guidance
embedding; :class:`~idcraft.training.instantcharacter.InstantCharacterRecipe`), the prediction made with the
ID tokens (a sample whose reference is dropped runs without them, weight 0), plus the alignment loss at the
output of every block followed by an ID cross-attention (the block's text stream is ``K``, its image stream
``Q``).

The result is ``OUTPUT/adapter.safetensors`` in the release layout (``pulid_encoder.*``, ``pulid_ca.{i}.*``),
which ``idcraft generate --method pulid-flux`` loads. ``--init-from`` starts from a release file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..errors import IdcraftError
from .instantcharacter import InstantCharacterRecipe
from .pulid_faces import FACE_SETTINGS, PulidFaceInputs, alignment_losses
from .recipe import engine_preview, export_tensors, register_recipe, write_flat_release

SETTINGS = (
    "guidance",
    "timestep_density",
    "logit_mean",
    "logit_std",
    "max_sequence_length",
    "ca_heads",
    *FACE_SETTINGS,
)
DEFAULT_MAX_SEQUENCE_LENGTH = 128


class PulidFluxDenoiser(nn.Module):
    """FLUX transformer + IDFormer + ID cross-attention as one module (what ``accelerate.prepare`` wraps):
    ID tokens with gradient, the prediction with them, and the alignment features."""

    def __init__(self, transformer: nn.Module, adapter):
        super().__init__()
        self.transformer = transformer
        self.pulid_encoder = adapter.pulid_encoder
        self.pulid_ca = adapter.pulid_ca
        self._captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        config = transformer.config
        from ..pulid.flux import injection_points

        blocks = {"double": transformer.transformer_blocks, "single": transformer.single_transformer_blocks}
        for kind, index in injection_points(config.num_layers, config.num_single_layers):
            # Registered after the injection's own hooks: they see the block output with the identity added.
            blocks[kind][index].register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple, output: tuple) -> None:
        if self._capturing:
            self._captured.append(output)

    _capturing = False

    def forward(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        text: torch.Tensor,
        pooled: torch.Tensor,
        text_ids: torch.Tensor,
        image_ids: torch.Tensor,
        guidance: torch.Tensor | None,
        id_cond: torch.Tensor,
        hidden: list[torch.Tensor],
        keep: torch.Tensor,
        align: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(prediction, semantic alignment loss, layout alignment loss)``; the alignment terms are 0
        when ``align`` is false."""
        from ..pulid.flux import id_call

        dtype = self.pulid_encoder.latents.dtype
        tokens = self.pulid_encoder(id_cond.to(dtype), [h.to(dtype) for h in hidden]).to(latents.dtype)
        weight = keep.to(latents.dtype).view(-1, 1, 1)
        inputs = dict(
            hidden_states=latents,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=sigmas,
            img_ids=image_ids,
            txt_ids=text_ids,
            guidance=guidance,
            return_dict=False,
        )
        self._captured, self._capturing = [], align
        try:
            with id_call(self.pulid_ca.call(tokens, weight)):
                prediction = self.transformer(**inputs)[0]
            with_id, self._captured = self._captured, []
            zero = prediction.new_zeros(())
            if not align:
                return prediction, zero, zero
            with torch.no_grad():
                self.transformer(**inputs)
            without = self._captured
        finally:
            self._captured, self._capturing = [], False
        points = [
            (text, image_id, image) for (_, image_id), (text, image) in zip(with_id, without, strict=True)
        ]
        sem, layout = alignment_losses(points, keep)
        return prediction, sem, layout


@register_recipe
class PulidFluxRecipe(PulidFaceInputs, InstantCharacterRecipe):
    """PuLID-FLUX on FLUX.1 (see the module docstring). The flow-matching helpers (latents, text, noise
    levels) are InstantCharacter's: the same FLUX objective."""

    methods = ("pulid-flux",)
    method_name = "pulid-flux"

    # ------------------------------------------------------------------ modules
    def build(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        from ..pulid.flux_pipeline import _is_sd_base

        config = self.config
        self.check_extra(SETTINGS)
        sd_class = _is_sd_base(config.base)
        if sd_class is not None:
            raise IdcraftError(
                f"pulid-flux trains on FLUX.1; base model {config.base} is a {sd_class} (use --method pulid)."
            )
        self.load_face_models(device, weight_dtype)
        self.load_frozen_flux(device, weight_dtype)
        pipe = self.pipe

        adapter = self._adapter()
        adapter.pulid_ca.check_compatible(pipe.transformer, f"base model {config.base}")
        adapter.to(device=device, dtype=torch.float32).requires_grad_(True).train()
        adapter.pulid_ca.attach(pipe.transformer)
        self.adapter = adapter
        self.idformer = adapter.pulid_encoder
        self.model = PulidFluxDenoiser(pipe.transformer, adapter)

    def _adapter(self):
        from ..pulid.flux import PulidFluxInjection
        from ..pulid.flux_pipeline import PulidFluxAdapter
        from ..pulid.idformer import IDFormer

        config = self.config
        if config.init_from:
            adapter = PulidFluxAdapter.from_file(config.init_from)
            if adapter.pulid_encoder is None:
                raise IdcraftError(f"--init-from {config.init_from}: no pulid_encoder.* (IDFormer) tensors.")
            return adapter.float()
        id_former = IDFormer(**self.idformer_settings())
        heads = int(config.extra.get("ca_heads", 16))
        injection = PulidFluxInjection.for_transformer(
            self.pipe.transformer, id_former.config.output_dim, heads
        )
        return PulidFluxAdapter(injection, id_former)

    @property
    def resolution(self) -> int:
        return self.config.resolution or 1024

    def frozen_modules(self) -> dict[str, nn.Module]:
        names = ("transformer", "vae", "text_encoder", "text_encoder_2")
        return {**{n: getattr(self.pipe, n) for n in names}, **self.face_modules()}

    # ------------------------------------------------------------------ objective
    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        length = int(self.config.extra.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))
        text, pooled, text_ids = self.pipe.encode_prompt(
            prompt=captions, prompt_2=captions, device=self.device, max_sequence_length=length
        )
        return text.to(self.weight_dtype), pooled.to(self.weight_dtype), text_ids

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        drop_image, captions = self.caption_drops(batch, generator)
        latents, noise, sigmas = self.noised_latents(batch, generator)
        flow = self.flow_inputs(latents, noise, sigmas, captions)
        id_cond, hidden = self.batch_features(batch)
        keep = ~drop_image.to(self.device)
        sem_weight, layout_weight = self.align_weights()
        prediction, sem, layout = model(
            flow.packed,
            sigmas.to(self.weight_dtype),
            flow.text,
            flow.pooled,
            flow.text_ids,
            flow.image_ids,
            flow.guidance,
            id_cond,
            hidden,
            keep,
            sem_weight > 0 or layout_weight > 0,
        )
        return self.flow_loss(prediction, flow, batch) + sem_weight * sem + layout_weight * layout

    # ------------------------------------------------------------------ results
    def export(
        self,
        directory: Path,
        formats: Sequence[str],
        metadata: dict[str, str],
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> list[Path]:
        """``adapter.safetensors`` (and ``adapter.bin``) in the release layout: ``pulid_encoder.*`` then
        ``pulid_ca.{i}.*``."""
        state = self.trainable_state_dict() if state is None else state
        tensors = export_tensors(state, self.config.export_dtype)
        release = {}
        for key, tensor in tensors.items():
            if key.startswith("pulid_ca.ca."):
                release["pulid_ca." + key.removeprefix("pulid_ca.ca.")] = tensor
            elif key.startswith("pulid_encoder."):
                release[key] = tensor
            else:
                raise IdcraftError(f"unexpected trained tensor {key!r} (not pulid_encoder.* or pulid_ca.*).")
        return write_flat_release(release, directory, formats, {"method": "pulid-flux", **metadata})

    @torch.no_grad()
    def sample(
        self, prompt: str, reference: str, *, seed: int, steps: int, guidance: float
    ) -> list[Image.Image]:
        """Generate through the engine as a user would (the reference's face found with the run's face
        backend), with a copy of the trained adapter in a :class:`PulidFluxPipeline` on the frozen FLUX; the
        trained ID cross-attention is attached again afterwards."""
        import copy

        from ..pulid.encoder import PulidEncoder
        from ..pulid.flux_pipeline import PulidFluxPipeline

        transformer = self.pipe.transformer
        preview = copy.deepcopy(self.adapter).to(transformer.dtype).eval()
        try:
            faces = self.face_encoder
            encoder = PulidEncoder(preview.pulid_encoder, faces.eva, faces.parser)
            pipeline = PulidFluxPipeline(self.pipe, preview, encoder, device=self.device)
            return engine_preview(
                self, pipeline, prompt, reference, seed=seed, steps=steps, guidance=guidance
            )
        finally:
            preview.pulid_ca.detach()
            self.adapter.pulid_ca.attach(transformer)
