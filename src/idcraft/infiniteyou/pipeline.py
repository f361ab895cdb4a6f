"""Generation with InfiniteYou on diffusers' FLUX components.

The loop is the official ``FluxInfuseNetPipeline.__call__`` (read for its order of operations, written
here anew), run on the components of a diffusers ``FluxPipeline`` and an InfuseNet:

1. the prompt -> CLIP pooled + T5 embeddings (and the negative prompt's, for true CFG);
2. the identity embedding -> 8 tokens (Resampler), InfuseNet's ``encoder_hidden_states`` with all-zero
   text ids: InfuseNet never reads the text, only the pooled CLIP text;
3. the control image (:mod:`.control`) -> VAE posterior *sample* -> ``(z - shift) * scale`` -> packed;
4. initial latents; the flow-matching sigmas ``linspace(1, 1/n, n)`` shifted for the image size;
5. each step: InfuseNet at guidance 1.0 with scale ``scale x keep`` (keep = 0 outside
   ``[start, end]`` of the steps), its residuals given to ``FluxTransformer2DModel`` as
   ``controlnet_block_samples`` / ``controlnet_single_block_samples`` (the transformer maps double block i
   to sample ``i // ceil(blocks / samples)``, as the official code relies on), FLUX guidance 3.5; with a
   negative prompt and ``true_cfg`` != 1 a second pass on it without InfuseNet, mixed as
   ``neg + true_cfg * (pos - neg)``.

Random numbers: the official wrapper seeds the global RNG and draws the control image's posterior sample
first, then the initial latents, both on the run's device. Here ``seed`` seeds a ``torch.Generator`` on
the run's device that draws the same two in the same order, so a seed gives the official image for that
seed (on the CPU and on CUDA alike) while two requests on one pipeline never share a generator.

Everything a call needs lives in the call: the scheduler is a per-call copy
(:func:`idcraft.pipeline.request_view`), the tokens and control latents are locals.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..cancel import StepHook
from ..errors import IdcraftError, IncompatibleAdapterError
from ..models import meta_model, resolve_device
from ..pipeline import request_view, text_lock
from ..registry import get_method
from .control import control_image as make_control_image
from .release import ReleasePaths, load_image_proj, load_infusenet, locate_release

log = logging.getLogger(__name__)

#: The official wrapper's defaults.
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 3.5
DEFAULT_SCALE = 1.0
DEFAULT_WIDTH = 864
DEFAULT_HEIGHT = 1152
#: InfuseNet's own guidance-embedding value (the official wrapper passes 1.0).
INFUSENET_GUIDANCE = 1.0


def check_flux_base(base: str | os.PathLike) -> dict:
    """The base's ``model_index.json``; an SD (or other) base is refused in one line."""
    from diffusers import FluxPipeline

    from ..models import _unreachable

    try:
        index = FluxPipeline.load_config(str(base))
    except Exception as exc:
        raise _unreachable("base model", str(base), exc) from exc
    if not str(index.get("_class_name", "")).startswith("Flux"):
        raise IdcraftError(
            f"base model {base} is a {index.get('_class_name', '?')}; InfiniteYou runs on FLUX.1 (a FluxPipeline "
            "folder such as black-forest-labs/FLUX.1-dev or FLUX.1-schnell)."
        )
    return index


def check_compatible(infusenet, resampler, transformer, *, base_name: str = "the base model") -> None:
    """Raise :class:`IncompatibleAdapterError` naming both sides when InfuseNet, the Resampler and the
    FLUX transformer (possibly on the meta device) do not fit together."""
    net, flux = infusenet.config, transformer.config
    net_width = net.num_attention_heads * net.attention_head_dim
    flux_width = flux.num_attention_heads * flux.attention_head_dim
    if net_width != flux_width or net.in_channels != flux.in_channels:
        raise IncompatibleAdapterError(
            f"InfuseNet works at width {net_width} on {net.in_channels} latent channels, but {base_name} at width "
            f"{flux_width} on {flux.in_channels}: use a FLUX.1 base (dev or schnell) with this InfiniteYou model."
        )
    if net.pooled_projection_dim != flux.pooled_projection_dim:
        raise IncompatibleAdapterError(
            f"InfuseNet reads pooled CLIP text of width {net.pooled_projection_dim}, {base_name} makes "
            f"{flux.pooled_projection_dim}."
        )
    tokens = resampler.config.output_dim
    if tokens != net.joint_attention_dim:
        raise IncompatibleAdapterError(
            f"the identity projector makes tokens of width {tokens} but InfuseNet reads width "
            f"{net.joint_attention_dim}: image_proj_model.bin and InfuseNetModel/ come from different models."
        )


def _guidance_keep(step: int, steps: int, start: float, end: float) -> float:
    """1 while InfuseNet acts at ``step`` (official rule: off before ``start`` and after ``end``)."""
    return 1.0 - float(step / steps < start or (step + 1) / steps > end)


class InfiniteYouPipeline:
    """A diffusers ``FluxPipeline``, InfuseNet and the identity Resampler.

    Build it with :meth:`from_pretrained` (a FLUX folder and a release folder) or from objects you hold;
    ``offload`` is ``"none"``, ``"model"`` or ``"sequential"`` (the last two need a GPU).
    """

    method = get_method("infiniteyou")

    def __init__(
        self,
        pipe,
        infusenet,
        resampler,
        *,
        offload: str | None = None,
        device: torch.device | str | None = None,
    ):
        from ..flux_base import check_offload

        device = torch.device(device) if device is not None else pipe.device
        offload = check_offload(offload, device)
        check_compatible(infusenet, resampler, pipe.transformer)
        dtype = pipe.transformer.dtype
        self.pipe = pipe
        self.infusenet = infusenet.to(dtype=dtype).eval()
        self.resampler = resampler.to(dtype=dtype).eval()
        self.offload = offload
        self._device = device
        self.resampler.to(device)  # small: always where the run is
        if offload == "none":
            pipe.to(device)
            self.infusenet.to(device)
        elif offload == "model":
            self.infusenet.to(device)  # runs beside the transformer at every step
            pipe.enable_model_cpu_offload(device=device)
        else:
            from accelerate import cpu_offload

            cpu_offload(self.infusenet, execution_device=device)
            pipe.enable_sequential_cpu_offload(device=device)

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        adapter: str | os.PathLike,
        *,
        infusenet: str | os.PathLike | None = None,
        model_version: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        offload: str | None = None,
        check_memory: bool = True,
        width: int | None = None,
        height: int | None = None,
        loras: Sequence[tuple[str, float]] = (),
        report: Callable[[str], None] | None = None,
    ) -> InfiniteYouPipeline:
        """Load a FLUX base and an InfiniteYou release, checking memory and compatibility before the FLUX
        weights are read. ``loras`` are ``(file, weight)`` pairs for diffusers' FLUX LoRA loader (the
        release's optional realism / anti-blur LoRAs)."""
        from diffusers import FluxTransformer2DModel

        from ..flux_base import check_offload, flux_dtype, is_flux_base, load_flux_pipeline
        from .memory import estimate_memory

        check_flux_base(base)
        paths: ReleasePaths = locate_release(adapter, model_version, infusenet)
        dev = resolve_device(device)
        dt = flux_dtype(dtype, dev)
        offload = check_offload(offload, dev)
        try:
            estimate = estimate_memory(
                base, paths, device=dev, dtype=dt, offload=offload, width=width, height=height
            )
        except (OSError, ValueError, KeyError, IdcraftError) as exc:
            log.warning("memory estimate skipped: %s", exc)
            estimate = None
        if estimate is None:
            (report or log.info)("memory estimate: not available (it reads local folders and files only)")
        else:
            (report or log.info)(estimate.summary())
            if check_memory:
                estimate.check()
        resampler = load_image_proj(paths.image_proj)
        net = load_infusenet(paths.infusenet, dt)
        if is_flux_base(base):  # fail in milliseconds, before reading gigabytes
            meta = meta_model(FluxTransformer2DModel, base, "transformer")
            check_compatible(net, resampler, meta, base_name=f"base model {base}")
        if offload == "none":
            net.to(dev)
        pipe = load_flux_pipeline(base, dtype=dt, device=dev if offload == "none" else torch.device("cpu"))
        if loras:
            names = []
            for index, (path, _) in enumerate(loras):
                name = f"lora{index}"
                try:
                    pipe.load_lora_weights(str(path), adapter_name=name)
                except Exception as exc:
                    raise IdcraftError(f"--lora {path}: not a FLUX LoRA diffusers can load ({exc}).") from exc
                names.append(name)
            pipe.set_adapters(names, adapter_weights=[float(w) for _, w in loras])
        return cls(pipe, net, resampler, offload=offload, device=dev)

    # ----------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        """Where the computation runs (the GPU also when offloading)."""
        return self._device

    def identity_tokens(self, embedding) -> torch.Tensor:
        """The 8 identity tokens ``[1, 8, width]`` of one 512-d ArcFace embedding, used as given: the
        official pipeline feeds its recogniser's output straight to the Resampler (facexlib's ArcFace,
        :mod:`.recognition`, already gives unit length)."""
        vector = torch.as_tensor(np.asarray(embedding, dtype=np.float32)).reshape(-1)
        expected = self.resampler.config.embed_dim
        if vector.numel() != expected:
            raise IdcraftError(
                f"infiniteyou reads a {expected}-value ArcFace embedding, got {vector.numel()} values."
            )
        if not torch.isfinite(vector).all() or not vector.any():
            raise IdcraftError("the face embedding is all zeros or not finite.")
        param = self.resampler.latents
        with torch.no_grad():
            return self.resampler(vector.reshape(1, 1, -1).to(param.device, param.dtype))

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        *,
        tokens: torch.Tensor,
        keypoints=None,
        control: Image.Image | None = None,
        scale: float = DEFAULT_SCALE,
        start: float = 0.0,
        end: float = 1.0,
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
        """Generate ``num_images`` images of the identity ``tokens`` (:meth:`identity_tokens`).

        The control image is ``control`` if given, else drawn from ``keypoints`` (five ``[x, y]`` in output
        pixels), else all black. ``scale``/``start``/``end`` are the official InfuseNet conditioning scale
        and guidance window (fractions of the steps); ``guidance`` is FLUX's guidance embedding.
        ``on_step(done, total)`` is called before the first step and after each one (progress; it stops
        the call by raising :class:`~idcraft.errors.Cancelled`).
        """
        width = width or DEFAULT_WIDTH
        height = height or DEFAULT_HEIGHT
        if not 0 <= start <= end <= 1:
            raise IdcraftError(
                f"--infusenet-start {start:g} and --infusenet-end {end:g} must satisfy 0 <= start <= end <= 1."
            )
        runner = request_view(self.pipe, progress=progress)
        device = self.device
        transformer, vae, net = runner.transformer, runner.vae, self.infusenet
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None

        negative = negative_prompt if negative_prompt and true_cfg != 1 else None
        text = self._encode_text(runner, prompt, negative, num_images, max_sequence_length)
        batch = num_images
        id_tokens = tokens.to(device=device, dtype=transformer.dtype).expand(batch, -1, -1)
        id_text_ids = torch.zeros(id_tokens.shape[1], 3, device=device, dtype=text["prompt_embeds"].dtype)

        # Control image -> VAE posterior sample (first draw) -> shifted, scaled, packed.
        if control is None:
            control = make_control_image(width, height, keypoints)
        pixels = runner.image_processor.preprocess(control, height=height, width=width)
        pixels = pixels.repeat_interleave(batch, dim=0).to(device=device, dtype=vae.dtype)
        height, width = pixels.shape[-2:]
        channels = transformer.config.in_channels // 4
        cond = vae.encode(pixels).latent_dist.sample(generator)
        cond = (cond - vae.config.shift_factor) * vae.config.scaling_factor
        cond = runner._pack_latents(cond, batch, channels, cond.shape[2], cond.shape[3])

        # Initial latents (second draw) and the shifted flow-matching schedule.
        latents, image_ids = runner.prepare_latents(
            batch, channels, height, width, text["prompt_embeds"].dtype, device, generator
        )
        timesteps = self._timesteps(runner, steps, latents.shape[1], device)

        use_net_guidance = net.config.guidance_embeds
        use_guidance = transformer.config.guidance_embeds
        net_guidance = torch.full((batch,), INFUSENET_GUIDANCE, device=device) if use_net_guidance else None
        flux_guidance = torch.full((batch,), float(guidance), device=device) if use_guidance else None
        count = len(timesteps)
        if on_step is not None:
            on_step(0, count)
        with runner.progress_bar(total=count) as bar:
            for i, t in enumerate(timesteps):
                timestep = t.expand(batch).to(latents.dtype) / 1000
                keep = _guidance_keep(i, count, start, end)
                blocks = singles = None
                if keep and scale:
                    blocks, singles = net(
                        hidden_states=latents,
                        controlnet_cond=cond,
                        conditioning_scale=scale * keep,
                        timestep=timestep,
                        guidance=net_guidance,
                        pooled_projections=text["pooled_prompt_embeds"],
                        encoder_hidden_states=id_tokens,
                        txt_ids=id_text_ids,
                        img_ids=image_ids,
                        return_dict=False,
                    )
                noise = transformer(
                    hidden_states=latents,
                    timestep=timestep,
                    guidance=flux_guidance,
                    pooled_projections=text["pooled_prompt_embeds"],
                    encoder_hidden_states=text["prompt_embeds"],
                    controlnet_block_samples=blocks,
                    controlnet_single_block_samples=singles,
                    txt_ids=text["text_ids"],
                    img_ids=image_ids,
                    return_dict=False,
                )[0]
                if "negative_prompt_embeds" in text:  # true CFG: the negative pass has no InfuseNet
                    negative = transformer(
                        hidden_states=latents,
                        timestep=timestep,
                        guidance=flux_guidance,
                        pooled_projections=text["negative_pooled_prompt_embeds"],
                        encoder_hidden_states=text["negative_prompt_embeds"],
                        txt_ids=text["negative_text_ids"],
                        img_ids=image_ids,
                        return_dict=False,
                    )[0]
                    noise = negative + true_cfg * (noise - negative)
                latents = runner.scheduler.step(noise, t, latents, return_dict=False)[0]
                bar.update()
                if on_step is not None:
                    on_step(i + 1, count)

        latents = runner._unpack_latents(latents, height, width, runner.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        runner.maybe_free_model_hooks()
        return runner.image_processor.postprocess(image, output_type="pil")

    @staticmethod
    def _timesteps(runner, steps: int, sequence: int, device: torch.device) -> torch.Tensor:
        """The official schedule: sigmas ``linspace(1, 1/n, n)``, shifted by ``mu`` for the token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        config = runner.scheduler.config
        mu = calculate_shift(
            sequence,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / steps, steps)
        timesteps, _ = retrieve_timesteps(runner.scheduler, steps, device, sigmas=sigmas, mu=mu)
        return timesteps

    def _encode_text(self, runner, prompt: str, negative: str | None, num_images: int, length: int) -> dict:
        """CLIP + T5 embeddings of the prompt (and negative prompt) as the FLUX pipeline encodes them,
        under the tokenizer's lock (see :func:`idcraft.pipeline.text_lock`)."""
        kwargs = {"device": self.device, "num_images_per_prompt": num_images, "max_sequence_length": length}
        with text_lock(runner):
            embeds, pooled, ids = runner.encode_prompt(prompt=prompt, prompt_2=None, **kwargs)
            text = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "text_ids": ids}
            if negative is not None:
                embeds, pooled, ids = runner.encode_prompt(prompt=negative, prompt_2=None, **kwargs)
                text.update(
                    negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled, negative_text_ids=ids
                )
        return text
