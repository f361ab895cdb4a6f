"""Training recipe for InstantCharacter on a frozen FLUX.1 base: rectified-flow (flow-matching) objective.

What trains: the projector (``image_proj``: cross-layer / cross-scale blocks and the timestep-conditioned
resampler) and, on every double- and single-stream FLUX block, the subject attention's ``to_k_ip``,
``to_v_ip``, ``norm_ip_q`` and ``norm_ip_k``. Frozen: the FLUX transformer, the VAE, both text encoders
(CLIP, T5), SigLIP and DINOv2.

The objective follows diffusers' FLUX training scripts (``examples/dreambooth/train_dreambooth_lora_flux.py``):

1. the target image -> VAE latent (a sample of the posterior), ``(z - shift_factor) * scaling_factor``;
2. a noise level per sample: ``u`` uniform (``extra["timestep_density"] = "uniform"``, the script's
   ``none``) or ``sigmoid(N(logit_mean, logit_std))`` (``"logit_normal"``); index ``int(u * 1000)`` into the
   base scheduler's training sigmas; ``x_t = (1 - sigma) x_0 + sigma eps``;
3. latents packed into 2x2 patches with their latent image ids, text from the base's CLIP (pooled) and
   T5 encoders, FLUX's guidance embedding fed a fixed value (``extra["guidance"]``, 3.5, the script's
   default; only for guidance-distilled bases), the transformer's timestep input ``sigma``;
4. the loss is the MSE between the transformer's packed prediction and ``v = eps - x_0`` (weighting 1).

The subject tokens are computed with gradient here (the inference hook computes them without): the
projector's timestep-independent half once per reference, the resampler at each sample's own timestep
``sigma * 1000`` (the scheduler's ``t``, which is what the inference hook gives it). Every random draw
(CFG drops, VAE sample, noise, noise levels) comes from the loop's generator, in a fixed order.

Classifier-free-guidance drops are the shared ones (``drop_image``, ``drop_text``, ``drop_both``). A
dropped reference is what the pipeline's reference-free call is: the subject branch switched off
(``scale = 0``, the base FLUX output exactly), here per sample within one batched call
(:class:`PerSampleScale`). A dropped caption is the empty prompt.

**Stages** (the InstantCharacter paper's three-stage schedule) are configuration: ``stage`` (``--stage``)
sets the defaults for the training resolution and which reference a sample uses; each stage is its own
``idcraft train`` run, the next one starting from the previous result with ``--init-from``::

    idcraft train --method instantcharacter --stage 1 --data unpaired/ --output runs/s1 ...
    idcraft train --method instantcharacter --stage 2 --data pairs.jsonl --output runs/s2 \\
        --init-from runs/s1/adapter.safetensors ...
    idcraft train --method instantcharacter --stage 3 --data all.jsonl --output runs/s3 \\
        --init-from runs/s2/adapter.safetensors ...

========  ==========  ===========================================================================
stage     resolution  reference
========  ==========  ===========================================================================
1         512         unpaired: the image is its own reference (reconstruction); a listed
                      ``reference`` is ignored
2         512         paired: the manifest's ``reference``, a different image of the same character;
                      samples without one are skipped (and reported)
3         1024        both: the listed ``reference`` where there is one, else the image itself
(none)    1024        as stage 3
========  ==========  ===========================================================================

``--resolution`` overrides the stage's resolution. ``--image-encoder`` is SigLIP, ``--image-encoder-2``
DINOv2. The result is ``OUTPUT/adapter.safetensors`` in the official layout (``--export-dtype``, float32 by
default), which ``idcraft generate --method instantcharacter`` and :class:`InstantCharacterPipeline` load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..checkpoints import AdapterCheckpoint, load_checkpoint
from ..errors import IdcraftError
from ..images import load_image
from ..instantcharacter.processors import SubjectCall, subject_call
from .checkpointing import enable_gradient_checkpointing
from .diffusion import draw_drops, latent_weights, weighted_mse
from .recipe import (
    TrainingRecipe,
    adapter_checkpoint,
    engine_preview,
    export_tensors,
    register_adapter,
    register_recipe,
    write_adapter,
)

#: stage -> (default resolution, pairing)
STAGES = {1: (512, "self"), 2: (512, "paired"), 3: (1024, "any"), None: (1024, "any")}
DEFAULT_GUIDANCE = 3.5
DEFAULT_MAX_SEQUENCE_LENGTH = 512
SETTINGS = ("guidance", "timestep_density", "logit_mean", "logit_std", "max_sequence_length", "projector")


class SubjectPreprocess:
    """Reference image -> SigLIP and DINOv2 pixels of the official five views (the 384 view, then the four
    tiles of the 768 view): ``{"siglip_pixels": [5, 3, 384, 384], "dinov2_pixels": [5, 3, 384, 384]}``.

    Picklable, for DataLoader workers. Its ``record_inputs`` picks the reference the stage asks for (the
    loop calls it with each record instead of passing the listed reference)."""

    def __init__(self, siglip_processor, dinov2_processor, pairing: str = "any"):
        self.siglip_processor = siglip_processor
        self.dinov2_processor = dinov2_processor
        self.pairing = pairing

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        from ..instantcharacter.encoders import LOW_RES, subject_views

        low, tiles = subject_views(image)
        views = [low, *tiles]
        siglip = self.siglip_processor(images=views, return_tensors="pt").pixel_values
        dinov2 = self.dinov2_processor(
            images=views,
            size={"shortest_edge": LOW_RES},
            crop_size={"height": LOW_RES, "width": LOW_RES},
            return_tensors="pt",
        ).pixel_values
        return {"siglip_pixels": siglip, "dinov2_pixels": dinov2}

    def record_inputs(self, record, geometry) -> dict[str, torch.Tensor]:
        if self.pairing == "self":
            path = record.image
        elif self.pairing == "paired":
            if record.reference is None or Path(record.reference) == Path(record.image):
                raise IdcraftError(
                    f"{record.image}: stage 2 trains on pairs, but the manifest gives no other image of this "
                    'character as "reference"'
                )
            path = record.reference
        else:
            path = record.reference_path
        return self(load_image(path))


@dataclasses.dataclass
class FlowInputs:
    """One flow-matching training step's transformer inputs and target (see
    :meth:`InstantCharacterRecipe.flow_inputs`); the FLUX recipes share it."""

    latent_shape: tuple[int, int, int, int]
    packed: torch.Tensor
    target: torch.Tensor
    image_ids: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    guidance: torch.Tensor | None


class PerSampleScale:
    """The subject branch's scale per sample (1 kept, 0 dropped), standing in for the shared state's float
    ``scale`` while the whole batch goes through the transformer in one call.

    The processors use the scale twice: ``scale == 0`` switches the branch off (never true here: the branch
    runs for the batch) and ``subject * scale`` weights it, which this masks per sample (``__rmul__``). A
    dropped sample's output is then the base model's exactly (plus exact zeros), as in the pipeline's
    reference-free call, and its subject tokens get zero gradient."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, keep: torch.Tensor):
        self.keep = keep

    def __eq__(self, other: object) -> bool:
        return False

    def __rmul__(self, subject: torch.Tensor) -> torch.Tensor:
        mask = self.keep.to(device=subject.device, dtype=subject.dtype)
        return subject * mask.view(-1, *([1] * (subject.dim() - 1)))


class SubjectDenoiser(nn.Module):
    """FLUX transformer + projector as one module (what ``accelerate.prepare`` wraps; the subject attention
    weights are the transformer's processors): subject tokens with gradient, then one transformer call
    for the whole batch with the subject branch weighted 1 for kept samples and 0 for dropped ones.

    One call, whatever the drops: under FSDP every process must run the same sequence of (sharded) module
    calls, and a call per kept/dropped subset would depend on each process's own drops. Every trainable
    parameter is in the graph of every step (DDP requires that), with zero gradient from dropped samples."""

    def __init__(self, transformer: nn.Module, adapter):
        super().__init__()
        self.transformer = transformer
        register_adapter(self, adapter, "projector")  # its attention processors are in the transformer

    def forward(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        text: torch.Tensor,
        pooled: torch.Tensor,
        text_ids: torch.Tensor,
        image_ids: torch.Tensor,
        guidance: torch.Tensor | None,
        features: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        projector, state = self.adapter.projector, self.adapter.state
        dtype = projector.resampler.latents.dtype
        shallow, deep, high = split_features(features.to(dtype))
        prepared = projector.prepare(shallow, deep, high)
        tokens = projector.tokens(prepared, sigmas.to(dtype) * 1000)
        # The tokens travel in the call's context (as at inference), so a checkpointed block recomputed in
        # backward() sees them too (training.checkpointing).
        call = SubjectCall(
            owner=state,
            prepared=None,
            scale=PerSampleScale(keep),
            tokens=tokens.to(latents.dtype),
            text_len=text.shape[1],
        )
        with subject_call(call):
            return self.transformer(
                hidden_states=latents,
                encoder_hidden_states=text,
                pooled_projections=pooled,
                timestep=sigmas,
                img_ids=image_ids,
                txt_ids=text_ids,
                guidance=guidance,
                return_dict=False,
            )[0]


def split_features(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, 8 P, W]`` (shallow 3 P, deep P, tiles 4 P) -> the projector's three inputs."""
    patches = features.shape[1] // 8
    return features.split([3 * patches, patches, 4 * patches], dim=1)


@register_recipe
class InstantCharacterRecipe(TrainingRecipe):
    """InstantCharacter on FLUX.1 (see the module docstring)."""

    methods = ("instantcharacter",)

    # ------------------------------------------------------------------ modules
    def load_frozen_flux(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """The frozen FLUX.1 base every FLUX recipe trains beside: the pipeline in ``weight_dtype``
        (transformer, VAE and text encoders frozen, no progress bars), a flow-matching scheduler for the
        noise levels, the noise-level density (``extra.timestep_density``) and the resolution checked
        against the VAE's downsampling times FLUX's 2x2 latent patches."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from ..flux_base import load_flux_pipeline

        config = self.config
        self.device, self.weight_dtype = device, weight_dtype
        self.density = str(config.extra.get("timestep_density", "uniform"))
        if self.density not in ("uniform", "logit_normal"):
            raise IdcraftError(f"timestep_density must be uniform or logit_normal (got {self.density!r}).")
        pipe = load_flux_pipeline(config.base, dtype=weight_dtype, device=device)
        pipe.set_progress_bar_config(disable=True)
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            getattr(pipe, name).requires_grad_(False).eval()
        self.pipe = pipe
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        multiple = pipe.vae_scale_factor * 2
        if self.resolution % multiple:
            raise IdcraftError(
                f"resolution {self.resolution} is not a multiple of {multiple} (the VAE's downsampling "
                "times FLUX's 2x2 latent patches)."
            )
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(pipe.transformer)

    def build(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        from ..flux_base import flux_index
        from ..instantcharacter.adapter import InstantCharacterAdapter
        from ..instantcharacter.encoders import SubjectEncoder

        config = self.config
        self.check_extra(SETTINGS)
        if not config.image_encoder or not config.image_encoder_2:
            raise IdcraftError(
                "instantcharacter training needs --image-encoder (SigLIP, google/siglip-so400m-patch14-384) "
                "and --image-encoder-2 (DINOv2, facebook/dinov2-giant)."
            )
        flux_index(config.base, self.methods[0])
        self.encoder = SubjectEncoder.from_pretrained(
            config.image_encoder, config.image_encoder_2, device=device, dtype=weight_dtype
        )
        self.load_frozen_flux(device, weight_dtype)
        pipe = self.pipe

        if config.init_from:
            checkpoint = load_checkpoint(config.init_from)
            adapter = InstantCharacterAdapter.from_checkpoint(
                AdapterCheckpoint(
                    *(
                        {k: t.detach().clone().float() for k, t in g.items()}
                        for g in checkpoint.groups().values()
                    )
                )
            )
        else:
            adapter = InstantCharacterAdapter.for_transformer(pipe.transformer, self._projector_config())
        adapter.check_compatible(
            pipe.transformer,
            self.encoder.width,
            base_name=f"base model {config.base}",
            encoder_name=f"image encoders {config.image_encoder}, {config.image_encoder_2}",
        )
        adapter.to(device=device, dtype=torch.float32).requires_grad_(True).train()
        names = list(pipe.transformer.attn_processors)
        pipe.transformer.set_attn_processor({names[int(i)]: proc for i, proc in adapter.layers.items()})
        self.adapter = adapter
        self.model = SubjectDenoiser(pipe.transformer, adapter)

    def _projector_config(self):
        """The official projector's shape for these encoders and this transformer."""
        from ..instantcharacter.projector import ProjectorConfig

        width = self.encoder.width
        heads = 64
        if width % heads:
            raise IdcraftError(
                f"SigLIP + DINOv2 give features of width {width}, not a multiple of the projector's "
                f"{heads}-wide heads."
            )
        text_width = self.pipe.transformer.config.joint_attention_dim
        overrides = dict(self.config.extra.get("projector", {}))  # e.g. a small projector for tests
        official = ProjectorConfig.official(width, text_width, self.config.num_tokens or 1024)
        return dataclasses.replace(official, **overrides)

    @property
    def pairing(self) -> str:
        return STAGES[self.config.stage][1]

    @property
    def resolution(self) -> int:
        return self.config.resolution or STAGES[self.config.stage][0]

    def frozen_modules(self) -> dict[str, nn.Module]:
        names = ("transformer", "vae", "text_encoder", "text_encoder_2")
        return {
            **{n: getattr(self.pipe, n) for n in names},
            "siglip": self.encoder.siglip,
            "dinov2": self.encoder.dinov2,
        }

    # ------------------------------------------------------------------ data
    def reference_preprocessor(self) -> SubjectPreprocess:
        return SubjectPreprocess(self.encoder.siglip_processor, self.encoder.dinov2_processor, self.pairing)

    @torch.no_grad()
    def encode_references(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, 5, 3, 384, 384]`` pixels of both encoders -> ``[B, 8 P, W]``: the low view's shallow
        (3 P) and deep (P) tokens, then the four tiles' deep tokens, SigLIP and DINOv2 side by side."""
        enc = self.encoder
        siglip_pixels = inputs["siglip_pixels"].to(self.device, dtype=enc.siglip.dtype)
        dinov2_pixels = inputs["dinov2_pixels"].to(self.device, dtype=enc.dinov2.dtype)
        count = siglip_pixels.shape[0]
        low = enc.siglip(siglip_pixels[:, 0], output_hidden_states=True)
        s_shallow = torch.cat([low.hidden_states[i] for i in enc.siglip_layers], dim=1)
        s_deep = low.last_hidden_state
        s_tiles = enc.siglip(siglip_pixels[:, 1:].flatten(0, 1)).last_hidden_state
        low = enc.dinov2(dinov2_pixels[:, 0], output_hidden_states=True)
        d_shallow = torch.cat([low.hidden_states[i][:, 1:] for i in enc.dinov2_layers], dim=1)
        d_deep = low.last_hidden_state[:, 1:]
        d_tiles = enc.dinov2(dinov2_pixels[:, 1:].flatten(0, 1)).last_hidden_state[:, 1:]
        if s_deep.shape[1] != d_deep.shape[1]:
            raise IdcraftError(
                f"SigLIP gives {s_deep.shape[1]} patch tokens per view but DINOv2 {d_deep.shape[1]}; "
                "InstantCharacter needs the same grid from both."
            )
        siglip = torch.cat([s_shallow, s_deep, s_tiles.reshape(count, -1, s_tiles.shape[-1])], dim=1)
        dinov2 = torch.cat([d_shallow, d_deep, d_tiles.reshape(count, -1, d_tiles.shape[-1])], dim=1)
        return torch.cat([siglip, dinov2.to(siglip.dtype)], dim=2)

    def cache_fingerprint(self) -> dict | None:
        if self.pairing != "any":  # the cache keys on the listed reference; stages 1 and 2 choose their own
            return None
        return {
            "recipe": "instantcharacter",
            "image_encoder": str(self.config.image_encoder),
            "image_encoder_2": str(self.config.image_encoder_2),
            "dtype": str(self.weight_dtype),
            "siglip_config": repr(self.encoder.siglip.config.to_dict()),
            "dinov2_config": repr(self.encoder.dinov2.config.to_dict()),
        }

    # ------------------------------------------------------------------ objective
    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.pipe.vae
        posterior = vae.encode(pixels.to(self.device, dtype=vae.dtype)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(self.device, posterior.mean.dtype)
        latents = posterior.mean + posterior.std * noise
        return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).to(self.weight_dtype)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        length = int(self.config.extra.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))
        text, pooled, text_ids = self.pipe.encode_prompt(
            prompt=captions, prompt_2=captions, device=self.device, max_sequence_length=length
        )
        return text.to(self.weight_dtype), pooled.to(self.weight_dtype), text_ids

    def draw_sigmas(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Noise levels from the scheduler's training sigmas, at indices drawn from the configured density."""
        extra = self.config.extra
        if self.density == "logit_normal":
            mean, std = float(extra.get("logit_mean", 0.0)), float(extra.get("logit_std", 1.0))
            u = torch.sigmoid(torch.randn(count, generator=generator) * std + mean)
        else:
            u = torch.rand(count, generator=generator)
        steps = self.scheduler.config.num_train_timesteps
        indices = (u * steps).long().clamp(max=steps - 1)
        return self.scheduler.sigmas[:steps][indices].float()

    def caption_drops(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """Which samples lose their reference, and the captions with the dropped texts emptied (the
        classifier-free guidance drops, drawn first from ``generator``)."""
        config = self.config
        drop_image, drop_text = draw_drops(
            len(batch["caption"]), (config.drop_image, config.drop_text, config.drop_both), generator
        )
        captions = ["" if d else t for t, d in zip(batch["caption"], drop_text.tolist(), strict=True)]
        return drop_image, captions

    def noised_latents(
        self, batch: dict, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The images' latents, their noise and a noise level per sample, drawn in that order."""
        latents = self.encode_latents(batch["pixels"], generator)
        noise = torch.randn(latents.shape, generator=generator).to(self.device, latents.dtype)
        sigmas = self.draw_sigmas(len(batch["caption"]), generator).to(self.device)
        return latents, noise, sigmas

    def flow_inputs(
        self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, captions: list[str]
    ) -> FlowInputs:
        """The flow-matching step's transformer inputs and target: the noisy latents packed into FLUX's
        2x2 tokens, the velocity ``noise - latents`` packed the same way, image ids, the encoded text and
        the guidance embedding's value (``extra.guidance``)."""
        from diffusers import FluxPipeline

        count, channels, height, width = latents.shape
        s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
        noisy = (1 - s) * latents + s * noise
        text, pooled, text_ids = self.encode_text(captions)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            value = float(self.config.extra.get("guidance", DEFAULT_GUIDANCE))
            guidance = torch.full((count,), value, device=self.device, dtype=torch.float32)
        return FlowInputs(
            latent_shape=tuple(latents.shape),
            packed=FluxPipeline._pack_latents(noisy, count, channels, height, width),
            target=FluxPipeline._pack_latents(noise - latents, count, channels, height, width),
            image_ids=FluxPipeline._prepare_latent_image_ids(
                count, height // 2, width // 2, self.device, self.weight_dtype
            ),
            text=text,
            pooled=pooled,
            text_ids=text_ids,
            guidance=guidance,
        )

    def flow_loss(self, prediction: torch.Tensor, flow: FlowInputs, batch: dict) -> torch.Tensor:
        """The (masked) mean squared error against the velocity, the loss weights packed into 2x2 tokens
        exactly as the latents are."""
        from diffusers import FluxPipeline

        count, channels, height, width = flow.latent_shape
        weights = latent_weights(batch, (height, width))
        if weights is not None:
            weights = FluxPipeline._pack_latents(
                weights.expand(-1, channels, -1, -1), count, channels, height, width
            )
        return weighted_mse(prediction, flow.target, weights)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        drop_image, captions = self.caption_drops(batch, generator)
        latents, noise, sigmas = self.noised_latents(batch, generator)
        flow = self.flow_inputs(latents, noise, sigmas, captions)
        features = batch["features"].to(self.device) if "features" in batch else self.encode_references(batch)
        keep = ~drop_image.to(self.device)
        prediction = model(
            flow.packed,
            sigmas.to(self.weight_dtype),
            flow.text,
            flow.pooled,
            flow.text_ids,
            flow.image_ids,
            flow.guidance,
            features,
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
        state = self.trainable_state_dict() if state is None else state
        checkpoint = adapter_checkpoint(export_tensors(state, self.config.export_dtype), "projector.")
        info = {"method": "instantcharacter", "stage": str(self.config.stage or ""), **metadata}
        return write_adapter(checkpoint, directory, formats, info)

    @torch.no_grad()
    def sample(
        self, prompt: str, reference: str, *, seed: int, steps: int, guidance: float
    ) -> list[Image.Image]:
        """Generate through :class:`InstantCharacterPipeline` with a copy of the adapter (the pipeline attaches
        its own; detaching it puts the trained processors back)."""
        from ..instantcharacter.adapter import InstantCharacterAdapter
        from ..instantcharacter.pipeline import InstantCharacterPipeline

        groups = self.adapter.to_checkpoint().groups().values()
        preview = InstantCharacterAdapter.from_checkpoint(
            AdapterCheckpoint(*({k: t.detach().clone() for k, t in g.items()} for g in groups))
        )
        pipeline = InstantCharacterPipeline(self.pipe, preview, self.encoder, device=self.device)
        try:
            return engine_preview(
                self, pipeline, prompt, reference, seed=seed, steps=steps, guidance=guidance
            )
        finally:
            preview.detach()
