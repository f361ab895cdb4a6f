"""Generation with InstantCharacter on diffusers' ``FluxPipeline``.

The algorithm, as the official ``InstantCharacterFluxPipeline.__call__`` runs it:

1. the reference -> SigLIP + DINOv2 features (:mod:`.encoders`), once;
2. the projector's timestep-independent half, once (:meth:`SubjectProjector.prepare`);
3. the unchanged diffusers FLUX loop; before every transformer call a hook runs the resampler at the
   scheduler's timestep ``t`` (0..1000, cast to the latents' dtype, as the official code passes it) and the
   processors on all double- and single-stream blocks add the subject attention at ``scale``.

Guidance is FLUX-dev's: a guidance *embedding* (``guidance``, 3.5 officially), one transformer pass per
step. True classifier-free guidance is off by default, as in the official pipeline (``true_cfg_scale=1``);
with ``true_cfg > 1`` and a negative prompt each step runs a second pass on the negative prompt, and that
pass sees the *same* subject tokens at the same scale (the official code keeps them in the shared
attention kwargs for both passes). Defaults (28 steps, guidance 3.5, subject scale 0.8) are the official
ones.

Memory: bf16 by default on a GPU; ``offload="model"`` or ``"sequential"`` uses diffusers' CPU offloading
for the FLUX components, while the encoders and the projector's heavy half are moved to the GPU only for
their one call per reference and the small resampler stays there. :mod:`.memory` estimates the need
before anything is loaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from PIL import Image

from ..cancel import StepHook, diffusers_callback
from ..errors import IdcraftError
from ..flux_base import (
    check_offload,
    flux_dtype,
    flux_index,
    is_flux_base,
    load_flux_pipeline,
    meta_transformer,
    visiting,
)
from ..images import ImageInput
from ..models import resolve_device
from ..pipeline import request_view, text_lock
from .adapter import InstantCharacterAdapter
from .encoders import SubjectEncoder, SubjectFeatures
from .memory import MemoryEstimate, estimate_memory
from .processors import subject_call

log = logging.getLogger(__name__)

#: The official pipeline's defaults.
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 3.5
DEFAULT_SCALE = 0.8


class InstantCharacterPipeline:
    """A diffusers ``FluxPipeline``, an :class:`InstantCharacterAdapter` and a :class:`SubjectEncoder`.

    Build it with :meth:`from_pretrained` (paths or hub ids) or from objects you hold; ``offload`` is
    ``"none"``, ``"model"`` or ``"sequential"`` (the last two need a GPU).
    """

    def __init__(
        self,
        pipe,
        adapter: InstantCharacterAdapter,
        encoder: SubjectEncoder,
        *,
        offload: str | None = None,
        device: torch.device | str | None = None,
    ):
        device = torch.device(device) if device is not None else pipe.device
        offload = check_offload(offload, device)
        adapter.check_compatible(pipe.transformer, encoder.width)
        dtype = pipe.transformer.dtype
        self.pipe = pipe
        self.adapter = adapter
        self.encoder = encoder
        self.offload = offload
        self._device = device
        adapter.to(dtype=dtype).eval()
        adapter.attach(pipe.transformer)
        for model in encoder.models:
            model.to(dtype=dtype)
        if offload == "none":
            pipe.to(device)
            adapter.to(device)
            for model in encoder.models:
                model.to(device)
        else:
            adapter.projector.resampler.to(device)  # small, used at every step: stays on the GPU
            if offload == "model":
                pipe.enable_model_cpu_offload(device=device)
            else:
                pipe.enable_sequential_cpu_offload(device=device)

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        adapter: str | os.PathLike,
        image_encoder: str | os.PathLike,
        image_encoder_2: str | os.PathLike,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        offload: str | None = None,
        check_memory: bool = True,
        width: int | None = None,
        height: int | None = None,
        report: Callable[[str], None] | None = None,
    ) -> InstantCharacterPipeline:
        """Load everything, checking memory and compatibility before the FLUX weights are read.

        ``image_encoder`` is SigLIP (so400m-patch14-384), ``image_encoder_2`` DINOv2 (giant). The memory
        estimate (local folders only) goes to ``report`` (default: the log); with ``check_memory`` a run
        that does not fit stops here with a message saying what would fit. ``width``/``height`` are only
        used for the estimate.
        """
        flux_index(base, "InstantCharacter")  # a wrong or unreachable base fails first, in milliseconds
        dev = resolve_device(device)
        dt = flux_dtype(dtype, dev)
        offload = check_offload(offload, dev)
        estimate = _estimate_or_none(
            base,
            adapter,
            image_encoder,
            image_encoder_2,
            device=dev,
            dtype=dt,
            offload=offload,
            width=width,
            height=height,
        )
        if estimate is None:
            (report or log.info)("memory estimate: not available (it reads local folders and files only)")
        else:
            (report or log.info)(estimate.summary())
            if check_memory:
                estimate.check()
        ic = InstantCharacterAdapter.from_checkpoint(adapter)
        names = {
            "base_name": f"base model {base}",
            "encoder_name": f"image encoders {image_encoder}, {image_encoder_2}",
        }
        meta = meta_transformer(base) if is_flux_base(base) else None  # fail in milliseconds, before
        ic.check_compatible(meta, **names)  # reading gigabytes
        encoder = SubjectEncoder.from_pretrained(image_encoder, image_encoder_2, dtype=dt)
        ic.check_compatible(meta, encoder.width, **names)
        # Put the adapter and encoders where they run before the FLUX components pass through RAM.
        ic.to(dtype=dt)
        if offload == "none":
            ic.to(dev)
            for model in encoder.models:
                model.to(dev)
        pipe = load_flux_pipeline(base, dtype=dt, device=dev if offload == "none" else torch.device("cpu"))
        return cls(pipe, ic, encoder, offload=offload, device=dev)

    # ----------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        """Where the computation runs (the GPU also when offloading)."""
        return self._device

    def encode_reference(self, reference: ImageInput) -> SubjectFeatures:
        """The reference's SigLIP + DINOv2 features (reuse them across prompts, seeds and scales)."""
        with visiting(self.offload, self.device, self.encoder.models):
            return self.encoder.encode(reference)

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        reference: ImageInput | None = None,
        *,
        features: SubjectFeatures | None = None,
        scale: float = DEFAULT_SCALE,
        seed: int | None = None,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        true_cfg: float = 1.0,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        max_sequence_length: int = 512,
        progress: bool = True,
        on_step: StepHook | None = None,
    ) -> list[Image.Image]:
        """Generate ``num_images`` images of the reference's subject following ``prompt``.

        ``scale`` is the official ``subject_scale`` (0 gives the base FLUX image exactly). ``guidance`` is
        FLUX's guidance embedding; ``true_cfg > 1`` with a ``negative_prompt`` adds a negative pass per
        step. ``seed`` seeds ``torch.Generator("cpu")``. ``features`` (from :meth:`encode_reference`) skip
        the encoders. ``on_step(done, total)`` is called before the first step and after every step
        (:func:`idcraft.cancel.step_hook`); what it raises ends the call.
        """
        if features is None:
            if reference is None:
                raise IdcraftError("instantcharacter needs a reference image (--reference).")
            features = self.encode_reference(reference)
        prepared = None
        if scale != 0:
            with visiting(self.offload, self.device, self.adapter.projector.heavy_modules):
                prepared = self.adapter.prepare(features)
            prepared = prepared.to(self.device)
        runner = request_view(self.pipe, progress=progress)
        call = self.adapter.call(prepared, scale, lambda: runner.current_timestep)
        generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
        text = self._encode_text(
            runner, prompt, negative_prompt if true_cfg > 1 else None, num_images, max_sequence_length
        )
        if on_step is not None:
            on_step(0, steps)
        with subject_call(call):
            return runner(
                **text,
                true_cfg_scale=true_cfg,
                guidance_scale=guidance,
                num_inference_steps=steps,
                generator=generator,
                width=width,
                height=height,
                num_images_per_prompt=1,  # the embeddings are already one per image
                max_sequence_length=max_sequence_length,
                **diffusers_callback(on_step, steps),
            ).images

    def _encode_text(
        self, runner, prompt: str, negative_prompt: str | None, num_images: int, length: int
    ) -> dict:
        """The prompt's (and, for true CFG, the negative prompt's) CLIP + T5 embeddings, encoded as the
        FLUX pipeline would, under the tokenizer's lock (see :func:`idcraft.pipeline.text_lock`)."""
        kwargs = {"device": self.device, "num_images_per_prompt": num_images, "max_sequence_length": length}
        with text_lock(runner):
            embeds, pooled, _ = runner.encode_prompt(prompt=prompt, prompt_2=None, **kwargs)
            text = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
            if negative_prompt is not None:
                embeds, pooled, _ = runner.encode_prompt(prompt=negative_prompt, prompt_2=None, **kwargs)
                text.update(negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled)
        return text


def _estimate_or_none(base, adapter, image_encoder, image_encoder_2, **kwargs) -> MemoryEstimate | None:
    """:func:`~idcraft.instantcharacter.memory.estimate_memory`, or ``None`` (logged) when a file cannot be
    read: the estimate must never be why a run fails."""
    try:
        return estimate_memory(base, adapter, image_encoder, image_encoder_2, **kwargs)
    except (OSError, ValueError, KeyError, IdcraftError) as exc:
        log.warning("memory estimate skipped: %s", exc)
        return None
