"""Generation with PuLID-FLUX on diffusers' FLUX components, as the official ``app_flux.py`` samples.

The official code runs its own black-forest-labs FLUX and sampler (``flux/sampling.py``). Mapped onto
diffusers, step by step (checked against it on tiny random models, float32, within 2/255):

* noise: ``torch.randn(1, 16, 2*ceil(H/16), 2*ceil(W/16))`` from ``torch.Generator(device).manual_seed(seed)``
  -- here drawn in float32 from a CPU generator (the official app draws bfloat16 on its GPU, which no
  CPU run reproduces), then packed 2x2 as diffusers packs (the same ``(c ph pw)`` order as the official
  ``rearrange``), with the same image ids;
* schedule: ``linspace(1, 0, N+1)`` shifted by ``exp(mu) / (exp(mu) + (1/t - 1))`` with ``mu`` linear in
  the packed token count between (256, 0.5) and (4096, 1.15) -- exactly diffusers'
  ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting, given ``sigmas = linspace(1, 1/N, N)`` and
  ``mu = calculate_shift(tokens)`` as ``FluxPipeline`` gives them; the Euler step is the scheduler's;
* guidance: FLUX-dev's guidance embedding (4 officially), one pass per step; the transformer sees
  ``t`` in 0..1 (diffusers' ``timestep / 1000``);
* identity: the ID tokens act from step ``start_step`` on (before it the transformer runs without them);
* true CFG (``true_cfg > 1``): from step 1 on (the official ``timestep_to_start_cfg``), a second pass on the
  negative prompt with the *unconditional* ID tokens (IDFormer of zeros), ``neg + cfg * (pos - neg)``;
  diffusers' own true CFG would start at step 0 and reuse the positive tokens, hence this loop;
* text: T5 at ``max_sequence_length`` 128 (the app's), CLIP pooled, as ``FluxPipeline.encode_prompt``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..cancel import StepHook
from ..checkpoints import load_torch_file
from ..errors import CheckpointError, IdcraftError, IncompatibleAdapterError
from ..flux_base import visiting
from ..models import resolve_device
from ..pipeline import request_view, text_lock
from .encoder import FaceStages, IdTokens, PulidEncoder
from .flux import PulidFluxInjection, id_call, split_release

log = logging.getLogger(__name__)

#: The official app's defaults.
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 4.0
DEFAULT_SCALE = 1.0
DEFAULT_MAX_SEQUENCE_LENGTH = 128
#: The official ``timestep_to_start_cfg``: the negative pass of true CFG starts at this step.
TRUE_CFG_START = 1


# ----------------------------------------------------------------- release files
def read_release(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A release file's flat tensors (``.safetensors``, or a torch file read with ``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter file {path}: no such file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = load_torch_file(path)
    except Exception as exc:  # safetensors and torch raise many types for a damaged file
        raise CheckpointError(
            f"{path}: cannot be read as a PuLID file ({type(exc).__name__}: {exc})."
        ) from exc
    if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
        data = {f"{group}.{k}": v for group, d in data.items() for k, v in d.items()}
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors.")
    return data


class PulidFluxAdapter(nn.Module):
    """A PuLID-FLUX release: the IDFormer (``pulid_encoder``, may be absent when ID tokens are given) and
    the ID cross-attention modules (``pulid_ca``)."""

    def __init__(self, injection: PulidFluxInjection, id_former: nn.Module | None = None):
        super().__init__()
        self.pulid_ca = injection
        self.pulid_encoder = id_former

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PulidFluxAdapter:
        tensors = read_release(path)
        return cls.from_tensors(tensors, str(path))

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], source: str = "the checkpoint"
    ) -> PulidFluxAdapter:
        from ..registry import pulid_kind

        kind = pulid_kind(tensors)
        if kind == "pulid":
            raise IncompatibleAdapterError(
                f"{source} is a PuLID SDXL file (id_adapter.*, id_adapter_attn_layers.*): use it with "
                "--method pulid on an SDXL base; PuLID-FLUX needs pulid_flux_v0.9.x.safetensors."
            )
        if kind is None:
            raise CheckpointError(
                f"{source} holds no pulid_ca.* tensors: not a PuLID-FLUX file (pulid_flux_v0.9.0/0.9.1.safetensors)."
            )
        encoder_tensors, ca_tensors = split_release(tensors, source)
        injection = PulidFluxInjection.from_state_dict(ca_tensors, source)
        id_former = _id_former(encoder_tensors, source) if encoder_tensors else None
        if id_former is not None:
            out = _id_former_width(id_former)
            if out != injection.id_width:
                raise CheckpointError(
                    f"{source}: the IDFormer makes tokens of width {out} but the cross-attention reads {injection.id_width}."
                )
        return cls(injection, id_former)

    def to_release(self) -> dict[str, torch.Tensor]:
        """The release layout: ``pulid_encoder.*`` then ``pulid_ca.{i}.*``."""
        out = {}
        if self.pulid_encoder is not None:
            out.update({f"pulid_encoder.{k}": v for k, v in self.pulid_encoder.state_dict().items()})
        out.update({f"pulid_ca.{k}": v for k, v in self.pulid_ca.ca.state_dict().items()})
        return out


def _id_former(tensors: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The shared :class:`~idcraft.pulid.idformer.IDFormer`, widths from the shapes, loaded strictly."""
    from .idformer import IDFormer

    try:
        return IDFormer.from_state_dict(tensors).eval()
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: pulid_encoder.*: {exc}") from exc


def _encoder(pulid: PulidFluxAdapter, eva_clip, face_parser) -> PulidEncoder | None:
    """The shared identity encoder around the release's IDFormer, with the towers the user gave."""
    if pulid.pulid_encoder is None:
        return None
    eva = parser = None
    if eva_clip is not None:
        from .eva_clip import load_eva_tower
        from .pipeline import check_eva

        eva = load_eva_tower(eva_clip)
        check_eva(pulid.pulid_encoder, eva, eva_clip)
    if face_parser is not None:
        from .bisenet import load_bisenet

        parser = load_bisenet(face_parser)
    return PulidEncoder(pulid.pulid_encoder, eva, parser)


def _id_former_width(model: nn.Module) -> int:
    return int(model.proj_out.shape[1])


# ----------------------------------------------------------------- the pipeline
def _is_sd_base(base: str | os.PathLike) -> str | None:
    index = Path(base) / "model_index.json"
    try:
        name = str(json.loads(index.read_text()).get("_class_name", ""))
    except (OSError, ValueError):
        return None
    return None if name.startswith("Flux") else name


class PulidFluxPipeline:
    """A diffusers ``FluxPipeline`` with a PuLID-FLUX adapter attached (and, once given, the identity
    encoder chain that turns faces into ID tokens). ``offload``: ``"none"``, ``"model"``, ``"sequential"``."""

    def __init__(
        self,
        pipe,
        adapter: PulidFluxAdapter,
        encoder: PulidEncoder | None = None,
        *,
        offload: str | None = None,
        device: torch.device | str | None = None,
    ):
        from ..flux_base import check_offload

        device = torch.device(device) if device is not None else pipe.device
        self.offload = check_offload(offload, device)
        adapter.pulid_ca.check_compatible(pipe.transformer)
        if encoder is None and adapter.pulid_encoder is not None:
            encoder = PulidEncoder(adapter.pulid_encoder)
        self.pipe = pipe
        self.adapter = adapter
        self.encoder = encoder
        self._device = device
        dtype = pipe.transformer.dtype
        adapter.to(dtype=dtype).eval()
        if encoder is not None:
            encoder.to(dtype=dtype).eval()
        adapter.pulid_ca.attach(pipe.transformer)
        if self.offload == "none":
            pipe.to(device)
            adapter.to(device)
            if encoder is not None:
                encoder.to(device)
        else:
            adapter.pulid_ca.to(device)  # read after every injected block: stays on the GPU
            if self.offload == "model":
                pipe.enable_model_cpu_offload(device=device)
            else:
                pipe.enable_sequential_cpu_offload(device=device)

    @property
    def method(self):
        from ..registry import get_method

        return get_method("pulid-flux")

    @property
    def device(self) -> torch.device:
        return self._device

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        adapter: str | os.PathLike,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        offload: str | None = None,
        check_memory: bool = True,
        width: int | None = None,
        height: int | None = None,
        report: Callable[[str], None] | None = None,
        eva_clip: str | os.PathLike | None = None,
        face_parser: str | os.PathLike | None = None,
    ) -> PulidFluxPipeline:
        """Load, checking the files against each other and the memory before the FLUX weights are read.

        ``eva_clip`` is ``EVA02_CLIP_L_336_psz14_s6B.pt`` and ``face_parser`` facexlib's
        ``parsing_bisenet.pth``; each is needed only for the stages a request does not give (see
        :class:`~idcraft.pulid.encoder.FaceStages`)."""
        from ..flux_base import check_offload, flux_dtype, load_flux_pipeline, meta_transformer
        from .flux_memory import estimate_or_none

        sd_class = _is_sd_base(base)
        if sd_class is not None:
            raise IncompatibleAdapterError(
                f"{adapter} is a PuLID-FLUX file, but base model {base} is a {sd_class}: use a FLUX.1 base "
                "(black-forest-labs/FLUX.1-dev), or pulid_v1.1.safetensors with --method pulid on SDXL."
            )
        dev = resolve_device(device)
        dt = flux_dtype(dtype, dev)
        offload = check_offload(offload, dev)
        pulid = PulidFluxAdapter.from_file(adapter)
        meta = meta_transformer(base) if (Path(base) / "model_index.json").is_file() else None
        if meta is not None:
            pulid.pulid_ca.check_compatible(meta, f"base model {base}")
        encoder = _encoder(pulid, eva_clip, face_parser)
        estimate = estimate_or_none(
            base,
            adapter,
            device=dev,
            dtype=dt,
            offload=offload,
            width=width,
            height=height,
            eva_clip=eva_clip,
        )
        if estimate is None:
            (report or log.info)("memory estimate: not available (it reads local folders and files only)")
        else:
            (report or log.info)(estimate.summary())
            if check_memory:
                estimate.check()
        pulid.to(dtype=dt)
        if offload == "none":  # where they run, before the FLUX components pass through RAM
            pulid.to(dev)
            if encoder is not None:
                encoder.to(dev, dt)
        pipe = load_flux_pipeline(base, dtype=dt, device=dev if offload == "none" else torch.device("cpu"))
        return cls(pipe, pulid, encoder, offload=offload, device=dev)

    def encode(self, faces: list[FaceStages]) -> IdTokens:
        """The ID tokens (and unconditional tokens) of one identity's face(s); reuse them across prompts,
        seeds and settings."""
        if self.encoder is None:
            raise IdcraftError(
                "this PuLID-FLUX file has no pulid_encoder.* (IDFormer) tensors: give the ID tokens as conditioning."
            )
        with visiting(self.offload, self.device, [self.encoder]):
            tokens = self.encoder(faces)
        return tokens.to(self.device)

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        tokens: IdTokens | None,
        *,
        scale: float = DEFAULT_SCALE,
        start_step: int = 0,
        true_cfg: float = 1.0,
        negative_prompt: str = "",
        seed: int | None = None,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        progress: bool = False,
        output_type: str = "pil",
        on_step: StepHook | None = None,
    ) -> list[Image.Image] | np.ndarray:
        """``num_images`` images of the identity in ``tokens`` following ``prompt`` (see the module
        docstring for the algorithm). ``scale`` is the official ``id_weight`` (0 or ``tokens=None``: the
        base model alone); ``start_step`` the first step that sees the identity; ``true_cfg > 1`` adds the
        negative pass from step 1. ``seed`` seeds ``torch.Generator("cpu")``. ``on_step(done, total)`` is
        called before the first step and after each one (progress; it stops the call by raising
        :class:`~idcraft.errors.Cancelled`)."""
        runner = request_view(self.pipe, progress=progress)
        transformer = runner.transformer
        device = self.device
        dtype = transformer.dtype
        height = height or runner.default_sample_size * runner.vae_scale_factor
        width = width or runner.default_sample_size * runner.vae_scale_factor
        use_true_cfg = abs(true_cfg - 1.0) > 1e-2  # as official: 1.0 +- 0.01 is off
        text = self._encode_text(runner, prompt, num_images, max_sequence_length)
        negative = (
            self._encode_text(runner, negative_prompt, num_images, max_sequence_length)
            if use_true_cfg
            else None
        )

        latents, image_ids = self._initial_latents(runner, num_images, height, width, seed, dtype)
        timesteps = self._timesteps(runner, steps, latents.shape[1])
        guidance_vec = (
            torch.full((num_images,), float(guidance), device=device, dtype=torch.float32)
            if transformer.config.guidance_embeds
            else None
        )
        cond = uncond = None
        if tokens is not None and scale != 0:
            cond = tokens.cond.to(device=device, dtype=dtype)
            uncond = tokens.uncond.to(device=device, dtype=dtype) if tokens.uncond is not None else None

        injection = self.adapter.pulid_ca
        scheduler = runner.scheduler
        if on_step is not None:
            on_step(0, len(timesteps))
        with runner.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                timestep = t.expand(num_images).to(latents.dtype) / 1000
                with_id = i >= start_step
                with id_call(injection.call(cond if with_id else None, scale)):
                    pred = transformer(
                        hidden_states=latents,
                        timestep=timestep,
                        guidance=guidance_vec,
                        pooled_projections=text[1],
                        encoder_hidden_states=text[0],
                        txt_ids=text[2],
                        img_ids=image_ids,
                        return_dict=False,
                    )[0]
                if use_true_cfg and i >= TRUE_CFG_START:
                    with id_call(injection.call(uncond if with_id else None, scale)):
                        neg = transformer(
                            hidden_states=latents,
                            timestep=timestep,
                            guidance=guidance_vec,
                            pooled_projections=negative[1],
                            encoder_hidden_states=negative[0],
                            txt_ids=negative[2],
                            img_ids=image_ids,
                            return_dict=False,
                        )[0]
                    pred = neg + true_cfg * (pred - neg)
                latents = scheduler.step(pred, t, latents, return_dict=False)[0]
                bar.update()
                if on_step is not None:
                    on_step(i + 1, len(timesteps))

        latents = runner._unpack_latents(latents, height, width, runner.vae_scale_factor)
        vae = runner.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        runner.maybe_free_model_hooks()
        return runner.image_processor.postprocess(image, output_type=output_type)

    def _initial_latents(self, runner, batch: int, height: int, width: int, seed: int | None, dtype):
        """The official noise: float32 ``randn`` of ``[B, C, 2*(H//16), 2*(W//16)]`` from a CPU generator,
        then diffusers' 2x2 packing and image ids."""
        channels = runner.transformer.config.in_channels // 4
        h = 2 * (int(height) // (runner.vae_scale_factor * 2))
        w = 2 * (int(width) // (runner.vae_scale_factor * 2))
        generator = torch.Generator("cpu")
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        noise = torch.randn((batch, channels, h, w), generator=generator, dtype=torch.float32)
        noise = noise.to(device=self.device, dtype=dtype)
        latents = runner._pack_latents(noise, batch, channels, h, w)
        ids = runner._prepare_latent_image_ids(batch, h // 2, w // 2, self.device, dtype)
        return latents, ids

    def _timesteps(self, runner, steps: int, tokens: int) -> torch.Tensor:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        config = runner.scheduler.config
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(runner.scheduler, steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps

    def _encode_text(self, runner, prompt: str, num_images: int, length: int):
        """``(T5 embeddings, CLIP pooled, text ids)`` as ``FluxPipeline.encode_prompt`` makes them, under
        the tokenizer's lock (:func:`idcraft.pipeline.text_lock`)."""
        with text_lock(runner):
            return runner.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=num_images,
                max_sequence_length=length,
            )
