"""PuLID v1.1 on an SDXL base: load the release, encode faces, sample as the official pipeline does.

The base is an ordinary diffusers ``StableDiffusionXLPipeline`` (text encoders, VAE, UNet); its scheduler is
not used: :mod:`.sampling` runs the official k-diffusion samplers, the UNet once per CFG branch and step
(positive with the ID tokens, negative with the uncond ID tokens), exactly as ``pipeline_v1_1.py``.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from ..checkpoints import load_torch_file
from ..errors import CheckpointError, IdcraftError
from ..registry import get_method
from .encoder import FaceStages, IdTokens, PulidEncoder
from .idformer import IDFormer
from .sampling import DiscreteSchedule, check_sampler, initial_noise, sample_dpmpp_2m, sample_dpmpp_sde
from .sdxl import IDAttention, IdCall, id_call

#: The release's IDFormer group (SDXL); the FLUX release stores it as ``pulid_encoder.``.
IDFORMER_PREFIX = "id_adapter."


def read_release(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A PuLID release as one flat state dict (``.safetensors``, or a torch file read with
    ``weights_only=True``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"--adapter {path}: no such file (PuLID SDXL: pulid_v1.1.safetensors).")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = load_torch_file(str(path))
    except Exception as exc:  # noqa: BLE001 - an unreadable file is the user's input error
        raise CheckpointError(f"--adapter {path}: cannot read it ({exc}).") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"--adapter {path}: not a flat state dict of tensors.")
    return state


def is_pulid_sdxl(keys) -> bool:
    keys = list(keys)
    return any(k.startswith(IDFORMER_PREFIX) for k in keys) and any(
        k.startswith("id_adapter_attn_layers.") for k in keys
    )


class PulidSDXLPipeline:
    """A loaded SDXL base with PuLID attached. ``encode(faces)`` -> :class:`IdTokens`; ``__call__`` makes
    images. Per-request values travel with each call; one pipeline serves concurrent requests."""

    method = get_method("pulid")

    def __init__(self, pipe, encoder: PulidEncoder, id_attention: IDAttention):
        self.pipe = pipe
        self.encoder = encoder
        self.id_attention = id_attention
        self.schedule = DiscreteSchedule()
        self._lock = threading.Lock()
        self._vae_float32 = None
        id_attention.attach(pipe.unet)
        if id_attention.id_dim != encoder.idformer.config.output_dim:
            raise CheckpointError(
                f"the IDFormer makes {encoder.idformer.config.output_dim}-wide tokens but the ID attention reads "
                f"{id_attention.id_dim}: the file is inconsistent."
            )

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        adapter: str | os.PathLike,
        *,
        eva_clip: str | os.PathLike | None = None,
        face_parser: str | os.PathLike | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> PulidSDXLPipeline:
        """Check the release before reading the base model, then load everything on ``device``/``dtype``."""
        from ..models import base_kind, load_base_pipeline, resolve_device, resolve_dtype

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        release = read_release(adapter)
        if any(k.startswith("pulid_encoder.") for k in release):
            raise CheckpointError(
                f"{adapter} is a PuLID-FLUX release: use --method pulid-flux with a FLUX.1 base."
            )
        if not is_pulid_sdxl(release):
            raise CheckpointError(
                f"{adapter} is not a PuLID SDXL release (no id_adapter.* + id_adapter_attn_layers.* tensors)."
            )
        from ..flux_base import is_flux_base

        if is_flux_base(base):
            raise IdcraftError(
                f"{adapter} is PuLID v1.1 for SDXL, but --base {base} is FLUX.1: use an SDXL base, or "
                "pulid_flux_v0.9.x.safetensors with --method pulid-flux."
            )
        kind, name = base_kind(base)
        if kind != "sdxl":
            raise IdcraftError(f"PuLID v1.1 runs on SDXL; --base {base} is a {name}.")
        idformer = IDFormer.from_state_dict(release, prefix=IDFORMER_PREFIX)
        eva = None
        if eva_clip is not None:
            from .eva_clip import load_eva_tower

            eva = load_eva_tower(eva_clip)
            check_eva(idformer, eva, eva_clip)
        parser = None
        if face_parser is not None:
            from .bisenet import load_bisenet

            parser = load_bisenet(face_parser)
        pipe = load_base_pipeline(base, device=dev, dtype=dt)
        attention = IDAttention.from_release(pipe.unet, release)
        encoder = PulidEncoder(idformer, eva, parser).to(dev, dt)
        return cls(pipe, encoder, attention.to(dev, dt))

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def _decoder(self):
        """The VAE to decode with: a float32 copy, made once, when the base's VAE is float16 and asks to
        be upcast (SDXL's original VAE overflows in float16), as diffusers' SDXL pipeline does; the shared
        VAE itself is never changed (other requests may be using it)."""
        vae = self.pipe.vae
        if vae.dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
            return vae
        with self._lock:
            if self._vae_float32 is None:
                self._vae_float32 = copy.deepcopy(vae).to(torch.float32)
            return self._vae_float32

    def encode(self, faces: Sequence[FaceStages]) -> IdTokens:
        return self.encoder(faces)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        tokens: IdTokens,
        *,
        negative_prompt: str = "",
        scale: float = 0.8,
        num_zero: int = 20,
        ortho: str = "v2",
        sampler: str = "dpmpp_2m",
        seed: int = 0,
        steps: int = 25,
        guidance: float = 7.0,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        from ..pipeline import encode_text

        check_sampler(sampler)
        unet, vae = self.pipe.unet, self.pipe.vae
        height = height or unet.config.sample_size * self.pipe.vae_scale_factor
        width = width or height
        factor = self.pipe.vae_scale_factor
        device, dtype = unet.device, unet.dtype
        sigmas = self.schedule.karras(steps).to(device)
        shape = (num_images, unet.config.in_channels, height // factor, width // factor)
        noise, entropy = initial_noise(seed, shape)
        latents = noise.to(device) * sigmas[0]
        text = encode_text(self.pipe, prompt, negative_prompt, num_images)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
        time_ids = time_ids.repeat(num_images, 1)
        branches = (
            (
                text["prompt_embeds"],
                text["pooled_prompt_embeds"],
                IdCall(tokens.cond, scale, num_zero, ortho),
            ),
            (
                text["negative_prompt_embeds"],
                text["negative_pooled_prompt_embeds"],
                IdCall(tokens.uncond, scale, num_zero, ortho),
            ),
        )

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            x_in = (x / (sigma[:, None, None, None] ** 2 + 1.0) ** 0.5).to(dtype)
            t = self.schedule.timestep(sigma.float().cpu()).to(device)
            eps = []
            for context, pooled, call in branches:
                with id_call(call):
                    out = unet(
                        x_in,
                        t,
                        encoder_hidden_states=context,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                        return_dict=False,
                    )[0]
                eps.append(out.float())
            noise_pred = eps[1] + guidance * (eps[0] - eps[1])
            return x - noise_pred * sigma[:, None, None, None]

        if progress is not None:
            progress(0, len(sigmas) - 1)
        if sampler == "dpmpp_2m":
            latents = sample_dpmpp_2m(denoise, latents, sigmas, progress)
        else:
            latents = sample_dpmpp_sde(denoise, latents, sigmas, entropy, progress)
        vae = self._decoder()
        latents = latents.to(vae.dtype) / vae.config.scaling_factor
        images = vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(images, output_type="pil")


def check_eva(idformer: IDFormer, eva, path) -> None:
    """The EVA tower must give the widths the IDFormer was trained on (a wrong checkpoint is one line)."""
    config = idformer.config
    if eva.config.width != config.vit_dim or eva.config.embed_dim + 512 != config.id_dim:
        raise CheckpointError(
            f"--eva-clip {path}: its tower is {eva.config.width} wide with {eva.config.embed_dim}-d output, but "
            f"this PuLID file reads {config.vit_dim}-wide hidden states and a {config.id_dim - 512}-d class "
            "token: use EVA02_CLIP_L_336_psz14_s6B.pt (EVA02-CLIP-L-14-336)."
        )
    if len(eva.blocks) <= 20 and config.num_scales == 5:
        raise CheckpointError(
            f"--eva-clip {path}: {len(eva.blocks)} blocks; PuLID reads the inputs of blocks 4..20."
        )
