"""Training recipe for InfiniteYou on a frozen FLUX.1 base: InfuseNet + identity Resampler, flow matching.

What trains: InfuseNet (a FLUX ControlNet whose text input is the identity tokens) and the Resampler
(512-d ArcFace embedding -> 8 tokens). Frozen: the FLUX transformer, VAE, CLIP and T5. The official
training code was never released; this recipe follows the paper's setup and the official inference
wiring exactly, so what it trains loads and runs as the release does:

* identity: the L2-normalised ArcFace embedding of the sample's reference face (manifest ``embedding``
  files, or face analysis with ``--face-backend``; see :class:`idcraft.training.faceid.FaceTable`). The
  official recogniser is facexlib's IR-SE-50 (:mod:`idcraft.infiniteyou.recognition`): precompute the
  manifest's embeddings with it to train for the released models' identity space;
* control image: InstantID's keypoint image of the target's face in the training crop, VAE-encoded as the
  pipeline encodes it, replaced by the all-black image (the no-pose condition of inference) for a fraction
  ``extra["control_drop"]`` of samples (0.5 by default);
* InfuseNet runs at guidance 1.0 with all-zero token ids and adds its residuals to the transformer's
  blocks; a dropped identity (classifier-free drop) is InfuseNet switched off for that sample (its
  residuals zeroed), which is what the true-CFG negative pass of inference is;
* objective and noise levels as :mod:`idcraft.training.instantcharacter` (diffusers' FLUX scripts):
  ``x_t = (1 - s) x_0 + s eps``, target ``eps - x_0``, FLUX guidance ``extra["guidance"]`` (3.5).

**Stages** (the paper's two): ``--stage 1`` (``sim_stage1``, pretraining for identity similarity; InfuseNet
from the base's first blocks as ``FluxControlNetModel.from_transformer`` makes it, or ``--init-from`` a
release folder) and ``--stage 2`` (``aes_stage2``, fine-tuning a stage-1 result, which ``--init-from`` must
name, on aesthetic paired data)::

    idcraft train --method infiniteyou --stage 1 --base FLUX.1-dev --data real.jsonl --output runs/iyou
    idcraft train --method infiniteyou --stage 2 --base FLUX.1-dev --data synthetic.jsonl \\
        --output runs/iyou-aes --init-from runs/iyou/sim_stage1

The result is the release layout, ``OUTPUT/<sim_stage1|aes_stage2>/InfuseNetModel/`` and
``image_proj_model.bin`` (``--export-dtype``), which ``idcraft generate --method infiniteyou --adapter
OUTPUT`` loads (``--model-version`` picks the stage). ``extra`` keys: ``guidance``, ``timestep_density``,
``logit_mean``, ``logit_std``, ``max_sequence_length``, ``control_drop``, ``infusenet`` (``{"double": 4,
"single": 10}``) and ``resampler`` (shape overrides, e.g. a small one for tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..errors import IdcraftError
from ..registry import get_method
from .checkpointing import enable_gradient_checkpointing
from .instantcharacter import InstantCharacterRecipe
from .recipe import engine_preview, export_tensors, register_recipe

SETTINGS = (
    "guidance",
    "timestep_density",
    "logit_mean",
    "logit_std",
    "max_sequence_length",
    "control_drop",
    "infusenet",
    "resampler",
)
VERSIONS = {1: "sim_stage1", 2: "aes_stage2", None: "sim_stage1"}


class InfuseDenoiser(nn.Module):
    """FLUX transformer + InfuseNet + Resampler as one module (what ``accelerate.prepare`` wraps): identity
    tokens with gradient, InfuseNet on them and the control latents, its residuals (zero for samples whose
    identity is dropped) into one transformer call for the whole batch."""

    def __init__(self, transformer: nn.Module, infusenet: nn.Module, resampler: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.infusenet = infusenet
        self.resampler = resampler

    def forward(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        text: torch.Tensor,
        pooled: torch.Tensor,
        text_ids: torch.Tensor,
        image_ids: torch.Tensor,
        guidance: torch.Tensor | None,
        embeds: torch.Tensor,
        control: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        dtype = self.resampler.latents.dtype
        tokens = self.resampler(embeds.to(dtype).reshape(embeds.shape[0], 1, -1))
        net = self.infusenet
        count = latents.shape[0]
        net_guidance = torch.ones(count, device=latents.device) if net.config.guidance_embeds else None
        token_ids = torch.zeros(tokens.shape[1], 3, device=latents.device, dtype=text_ids.dtype)
        net_dtype = next(net.parameters()).dtype
        blocks, singles = net(
            hidden_states=latents.to(net_dtype),
            controlnet_cond=control.to(net_dtype),
            conditioning_scale=1.0,
            timestep=sigmas.to(net_dtype),
            guidance=net_guidance,
            pooled_projections=pooled.to(net_dtype),
            encoder_hidden_states=tokens.to(net_dtype),
            txt_ids=token_ids,
            img_ids=image_ids,
            return_dict=False,
        )
        mask = keep.to(device=latents.device, dtype=latents.dtype).view(-1, 1, 1)
        return self.transformer(
            hidden_states=latents,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=sigmas,
            img_ids=image_ids,
            txt_ids=text_ids,
            guidance=guidance,
            controlnet_block_samples=[b.to(latents.dtype) * mask for b in blocks],
            controlnet_single_block_samples=[s.to(latents.dtype) * mask for s in singles],
            return_dict=False,
        )[0]


@register_recipe
class InfiniteYouRecipe(InstantCharacterRecipe):
    """InfiniteYou on FLUX.1 (see the module docstring); FLUX loading, text, latents and noise levels are
    InstantCharacter's."""

    methods = ("infiniteyou",)

    # ------------------------------------------------------------------ modules
    def build(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        from ..infiniteyou.fresh import fresh_models
        from ..infiniteyou.pipeline import check_compatible, check_flux_base
        from ..infiniteyou.release import load_image_proj, load_infusenet, locate_release
        from .faceid import FacePreprocess, FaceTable

        config = self.config
        self.check_extra(SETTINGS)
        if config.stage == 2 and not config.init_from:
            raise IdcraftError(
                "infiniteyou stage 2 (aes) fine-tunes a stage-1 model: pass --init-from RUN/sim_stage1 "
                "(or a released model folder)."
            )
        self.control_drop = float(config.extra.get("control_drop", 0.5))
        if not 0 <= self.control_drop <= 1:
            raise IdcraftError(f"control_drop must be from 0 to 1 (got {self.control_drop}).")
        check_flux_base(config.base)
        self.load_frozen_flux(device, weight_dtype)
        pipe = self.pipe
        if config.init_from:
            paths = locate_release(config.init_from)
            infusenet = load_infusenet(paths.infusenet, torch.float32)
            resampler = load_image_proj(paths.image_proj)
        else:
            depth = dict(config.extra.get("infusenet", {}))
            infusenet, resampler = fresh_models(
                pipe.transformer,
                double=int(depth.get("double", 4)),
                single=int(depth.get("single", 10)),
                resampler=dict(config.extra.get("resampler", {})),
            )
        check_compatible(infusenet, resampler, pipe.transformer, base_name=f"base model {config.base}")
        for module in (infusenet, resampler):
            module.to(device=device, dtype=torch.float32).requires_grad_(True).train()
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(infusenet)
        self.infusenet, self.resampler = infusenet, resampler
        self.model = InfuseDenoiser(pipe.transformer, infusenet, resampler)
        self.method = get_method("infiniteyou")
        self.faces = FaceTable.build(config, self.method, target_kps=True)
        if not self.faces.usable():
            raise IdcraftError(
                f"--data {config.data}: no sample has a usable face; e.g. "
                f"{next(iter(self.faces.entries.values()), 'no samples')}"
            )
        self._preprocess = FacePreprocess(self.faces, self.method, 1, control=True)

    @property
    def pairing(self) -> str:
        return "any"

    @property
    def resolution(self) -> int:
        return self.config.resolution or 1024

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"infusenet": self.infusenet, "resampler": self.resampler}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {n: getattr(self.pipe, n) for n in ("transformer", "vae", "text_encoder", "text_encoder_2")}

    # ------------------------------------------------------------------ data
    def reference_preprocessor(self):
        return self._preprocess

    def encode_references(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return inputs["face_embeds"]

    def cache_fingerprint(self) -> dict | None:
        return None  # face data is always cached by the face table

    # ------------------------------------------------------------------ objective
    @torch.no_grad()
    def encode_control(self, control: torch.Tensor, drop: torch.Tensor, generator: torch.Generator):
        """Keypoint images ``[B, 3, R, R]`` in [0, 1] (all black where ``drop``) -> packed control latents,
        encoded as the pipeline encodes them (a posterior sample, shifted and scaled)."""
        from diffusers import FluxPipeline

        control = control.to(self.device) * (~drop.to(self.device)).view(-1, 1, 1, 1).to(control.dtype)
        latents = self.encode_latents(control * 2 - 1, generator)  # the image processor's [-1, 1]
        count, channels, height, width = latents.shape
        return FluxPipeline._pack_latents(latents, count, channels, height, width)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        drop_image, captions = self.caption_drops(batch, generator)
        drop_control = torch.rand(len(captions), generator=generator) < self.control_drop
        latents, noise, sigmas = self.noised_latents(batch, generator)
        control = self.encode_control(batch["control"], drop_control, generator)
        flow = self.flow_inputs(latents, noise, sigmas, captions)
        embeds = batch["face_embeds"].to(self.device)[:, 0]
        keep = ~drop_image.to(self.device)
        prediction = model(
            flow.packed,
            sigmas.to(self.weight_dtype),
            flow.text,
            flow.pooled,
            flow.text_ids,
            flow.image_ids,
            flow.guidance,
            embeds,
            control,
            keep,
        )
        return self.flow_loss(prediction, flow, batch)

    # ------------------------------------------------------------------ results
    def export(
        self,
        directory: Path,
        formats: Sequence[str],
        metadata: dict[str, str],
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> list[Path]:
        """The release layout under ``directory/<sim_stage1|aes_stage2>/`` (``formats`` do not apply: the
        release has one layout)."""
        from ..infiniteyou.release import save_release

        state = export_tensors(
            self.trainable_state_dict() if state is None else state, self.config.export_dtype
        )
        parts = {
            prefix: {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            for prefix in ("infusenet.", "resampler.")
        }
        infusenet = _copy_with(self.infusenet, parts["infusenet."])
        resampler = _copy_with(self.resampler, parts["resampler."])
        folder = save_release(Path(directory) / VERSIONS[self.config.stage], infusenet, resampler)
        return [folder]

    @torch.no_grad()
    def sample(
        self, prompt: str, reference: str, *, seed: int, steps: int, guidance: float
    ) -> list[Image.Image]:
        """Generate through :class:`InfiniteYouPipeline` with copies of the trained modules (the reference's
        face found with the run's face backend, embedded with facexlib's ArcFace from ``--face-models``)."""
        from ..infiniteyou.pipeline import InfiniteYouPipeline

        net = _copy_with(self.infusenet, self.infusenet.state_dict())
        proj = _copy_with(self.resampler, self.resampler.state_dict())
        pipeline = InfiniteYouPipeline(self.pipe, net, proj, device=self.device)
        return engine_preview(self, pipeline, prompt, reference, seed=seed, steps=steps, guidance=guidance)


def _copy_with(module: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``module``'s structure holding ``state`` (never the live, training module)."""
    import copy

    clone = copy.deepcopy(module)
    clone.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return clone.to(dtype=next(iter(state.values())).dtype).eval()
