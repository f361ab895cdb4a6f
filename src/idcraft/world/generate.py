"""Generation in the world: (method, reference identity, scene, scale, seed) -> 64x64 images.

One place for ``idcraft demo`` and ``idcraft eval`` to make images with the bundled models, so both show
the same thing. Every image has a :class:`Request`: whose reference portrait is given (the identity's
canonical :func:`~idcraft.world.render.render_reference`), which scene the prompt asks for, and the seed of
its initial noise (one ``torch.Generator`` per image, so an image does not depend on what else is in its
batch, and the same request gives the same noise under every method and scale: comparisons are paired).

Methods are the bundled adapters (:data:`ADAPTER_METHODS`), run through the same :class:`IPAdapterPipeline`
a user runs on real checkpoints, and baselines (:data:`BASELINES`) that bracket them:

* ``text-scene``: the base model with the scene-only prompt -- knows nothing of who is meant;
* ``text-coarse``: the base model with the caption naming the coarse identity (shape, colour) in words --
  the most text alone can do;
* ``copy``: the reference image itself -- identity perfect, prompt ignored;
* ``vae``: the ``render`` below, encoded and decoded by the base model's VAE -- the most any method
  that draws through this latent space can keep (the ceiling the UNet and the adapters are measured
  against);
* ``render``: the world's own render of the identity in the requested scene -- what a perfect model
  would draw (the judge's ceiling; used by ``idcraft eval``).

Adapter methods get the caption with the coarse identity words by default (``prompt="coarse"``), as a user
would describe the character; ``prompt="scene"`` leaves identity to the reference alone. Face methods read
the world's face analyser (``identity/`` in the bundle: detector + ArcFace-role recogniser); InstantID's
IdentityNet gets the keypoints of the face where the scene puts it (``instantid_keypoints="scene"``: the
pose image an InstantID user supplies) or the reference's own (``"reference"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import IdcraftError
from . import bundle
from .captions import caption
from .identity import Identity, identity_from_id
from .render import render, render_reference
from .scene import Scene

#: The bundled adapters, in the order rows are shown.
ADAPTER_METHODS: tuple[str, ...] = ("ip-adapter", "ip-adapter-plus", "faceid", "instantid")
#: Reference points measured beside the adapters (see the module docstring).
BASELINES: tuple[str, ...] = ("text-scene", "text-coarse", "copy", "vae", "render")
METHODS: tuple[str, ...] = ADAPTER_METHODS + BASELINES
#: Baselines that run no diffusion model and read no prompt (their images come from the world's renders).
RENDERED_BASELINES: tuple[str, ...] = ("copy", "vae", "render")
PROMPTS: tuple[str, ...] = ("coarse", "scene")

#: Sampling defaults for the miniature SD (arguments everywhere; tune with ``idcraft eval --steps``).
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
DEFAULT_BATCH = 32


@dataclass(frozen=True)
class Request:
    """One image to make: the reference identity, the scene the prompt asks for, the noise seed."""

    identity_id: int
    scene: Scene
    seed: int

    @property
    def identity(self) -> Identity:
        return identity_from_id(self.identity_id)

    def prompt(self, mode: str = "coarse") -> str:
        """The canonical caption: naming the coarse identity (``"coarse"``) or the scene only (``"scene"``)."""
        return caption(self.identity if mode == "coarse" else None, self.scene)


def reference_image(identity_id: int):
    """The reference portrait every method is given for ``identity_id`` (PIL, 64x64)."""
    return render_reference(identity_from_id(identity_id)).image


def prompt_for(method: str, request: Request, prompt: str = "coarse") -> str | None:
    """The prompt ``method`` is run with for ``request`` (None: the method reads no prompt)."""
    if method == "text-scene":
        return request.prompt("scene")
    if method == "text-coarse":
        return request.prompt("coarse")
    if method in RENDERED_BASELINES:
        return None
    return request.prompt(prompt)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise IdcraftError(f"unknown world method {method!r}; choose from {', '.join(METHODS)}.")


def available_methods(root: str | os.PathLike | None = None) -> tuple[str, ...]:
    """Adapter methods whose files are in the bundle (and, for face methods, its face analyser)."""
    base = Path(root) if root is not None else bundle.bundle_dir()
    out = []
    for method in ADAPTER_METHODS:
        needs = [bundle.ADAPTERS[method]]
        if method in ("faceid", "instantid"):
            needs.append(bundle.IDENTITY)
        if method == "instantid":
            needs.append(bundle.IDENTITYNET)
        if all((base / n).exists() for n in needs):
            out.append(method)
    return tuple(out)


def world_engine(bundle_root: str | os.PathLike | None = None, device: str | None = "auto", base=None):
    """An :class:`~idcraft.engine.Engine` serving every bundled adapter method on one shared miniature SD1.5
    base, with the world's face analyser -- the offline default of ``idcraft serve`` and what
    :class:`WorldGenerator` generates with. ``base``: an already loaded base pipeline to share."""
    import torch

    from ..adapter import IPAdapter
    from ..encoders import ClipImageEncoder
    from ..engine import Engine
    from ..models import load_base_pipeline, load_controlnet, resolve_device
    from ..pipeline import IPAdapterPipeline

    root = Path(bundle_root) if bundle_root is not None else bundle.bundle_dir()
    dev = resolve_device(device)
    if base is None:
        base = load_base_pipeline(bundle.bundle_path(bundle.SD, root), device=dev, dtype=torch.float32)
    methods = available_methods(root)
    encoder = None
    pipelines = {}
    for method in methods:
        adapter = IPAdapter.from_checkpoint(str(bundle.bundle_path(bundle.ADAPTERS[method], root)), method=method)
        if adapter.method.needs_image_encoder and encoder is None:
            encoder = ClipImageEncoder.from_pretrained(bundle.bundle_path(bundle.IMAGE_ENCODER, root), device=dev)
        controlnet = None
        if adapter.method.identitynet:
            controlnet = load_controlnet(bundle.bundle_path(bundle.IDENTITYNET, root), device=dev, dtype=torch.float32)
        pipelines[method] = IPAdapterPipeline(
            base, adapter, encoder if adapter.method.needs_image_encoder else None, controlnet=controlnet
        )
    if not pipelines:
        raise IdcraftError(f"no adapters in the world bundle at {root}: rebuild it with `idcraft world build`.")
    return Engine(
        pipelines,
        face_backend="world",
        face_models=bundle.bundle_path(bundle.IDENTITY, root),
        defaults={"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE},
    )


class WorldGenerator:
    """The bundle's models, each loaded once when first needed, and batched generation with them.

    ``bundle_root``: a bundle folder (default :func:`idcraft.world.bundle.bundle_dir`). ``device``:
    ``"auto"`` (CUDA when there is one), ``"cpu"``, ``"cuda"``...; always float32 (the models are small).
    """

    def __init__(self, bundle_root: str | os.PathLike | None = None, device: str | None = "auto"):
        from ..models import resolve_device

        self.root = Path(bundle_root) if bundle_root is not None else bundle.bundle_dir()
        bundle.bundle_path(bundle.SD, self.root)  # a missing bundle fails here, before any loading
        self.device = resolve_device(device)
        self._tokens: dict[tuple[str, int], object] = {}

    # ------------------------------------------------------------------ models
    @cached_property
    def base(self):
        """The miniature SD1.5 (diffusers ``StableDiffusionPipeline``)."""
        import torch

        from ..models import load_base_pipeline

        pipe = load_base_pipeline(
            bundle.bundle_path(bundle.SD, self.root), device=self.device, dtype=torch.float32
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @cached_property
    def encoder(self):
        """The CLIP-role image encoder."""
        from ..encoders import ClipImageEncoder

        return ClipImageEncoder.from_pretrained(
            bundle.bundle_path(bundle.IMAGE_ENCODER, self.root), device=self.device
        )

    @property
    def size(self) -> int:
        """Output side in pixels: the base model's native size (64 for the world)."""
        return int(self.base.unet.config.sample_size * self.base.vae_scale_factor)

    @cached_property
    def engine(self):
        """The bundle's :class:`~idcraft.engine.Engine` (every adapter method on the shared base model): the
        same engine, and so the same code path, a user gets from ``world_engine()`` or ``idcraft serve``."""
        return world_engine(self.root, self.device, base=self.base)

    def pipeline(self, method: str):
        """The loaded :class:`~idcraft.pipeline.IPAdapterPipeline` of an adapter method."""
        if method not in ADAPTER_METHODS:
            raise IdcraftError(f"{method!r} is not an adapter method ({', '.join(ADAPTER_METHODS)}).")
        return self.engine.pipeline(method)

    def conditioning(self, method: str, identity_id: int):
        """``identity_id``'s reference encoded for ``method`` by the engine (computed once per pair)."""
        from ..requests import GenerationRequest

        key = (method, identity_id)
        if key not in self._tokens:
            self.pipeline(method)  # an unknown method fails here
            request = GenerationRequest("", method=method, references=[reference_image(identity_id)])
            self._tokens[key] = self.engine.encode(request)
        return self._tokens[key]

    def tokens(self, method: str, identity_id: int):
        """Image tokens of ``identity_id``'s reference for ``method`` (:class:`~idcraft.pipeline.ReferenceTokens`)."""
        return self.conditioning(method, identity_id).value

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        method: str,
        requests: Sequence[Request],
        *,
        scale: float = 1.0,
        prompt: str = "coarse",
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        batch_size: int = DEFAULT_BATCH,
        instantid_keypoints: str = "scene",
        identitynet_scale: float = 1.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Images for ``requests`` with ``method``, uint8 ``[N, size, size, 3]``, ``batch_size`` images per
        pipeline call (each call runs the UNet on twice that: classifier-free guidance). ``scale``: the
        adapter scale (ignored by baselines). ``on_batch(n)`` is called after each batch of ``n`` images."""
        check_method(method)
        if prompt not in PROMPTS:
            raise IdcraftError(f"prompt {prompt!r}: choose from {', '.join(PROMPTS)}.")
        if instantid_keypoints not in ("scene", "reference"):
            raise IdcraftError(f"instantid_keypoints {instantid_keypoints!r}: choose scene or reference.")
        if steps < 1 or batch_size < 1:
            raise IdcraftError("steps and batch_size must be at least 1.")
        if method in RENDERED_BASELINES:
            out = np.stack([self._no_model(method, r) for r in requests]) if requests else self._empty()
            if method == "vae":
                out = self._through_vae(out, batch_size)
            if on_batch is not None:
                on_batch(len(requests))
            return out
        import torch

        chunks = []
        with torch.no_grad():
            for lo in range(0, len(requests), batch_size):
                chunk = list(requests[lo : lo + batch_size])
                chunks.append(
                    self._batch(
                        method, chunk, scale, prompt, steps, guidance, instantid_keypoints, identitynet_scale
                    )
                )
                if on_batch is not None:
                    on_batch(len(chunk))
        return np.concatenate(chunks) if chunks else self._empty()

    def _empty(self) -> np.ndarray:
        return np.zeros((0, 64, 64, 3), dtype=np.uint8)

    @staticmethod
    def _no_model(method: str, request: Request) -> np.ndarray:
        if method == "copy":
            return np.asarray(reference_image(request.identity_id), dtype=np.uint8)
        return np.asarray(render(request.identity, request.scene).image, dtype=np.uint8)

    def _through_vae(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """``images`` encoded (posterior mean) and decoded by the base model's VAE."""
        import torch

        from .trainers.vae import to_pixels

        vae, out = self.base.vae, []
        with torch.no_grad():
            for lo in range(0, len(images), batch_size):
                pixels = to_pixels(torch.from_numpy(images[lo : lo + batch_size])).to(self.device)
                latents = vae.encode(pixels).latent_dist.mean
                decoded = vae.decode(latents).sample.clamp(-1, 1).cpu()
                out.append(((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        return np.concatenate(out)

    def _batch(
        self,
        method: str,
        requests: list[Request],
        scale: float,
        prompt: str,
        steps: int,
        guidance: float,
        instantid_keypoints: str,
        identitynet_scale: float,
    ) -> np.ndarray:
        from ..requests import GenerationRequest

        if method not in ADAPTER_METHODS:
            return self._text_only([prompt_for(method, r, prompt) for r in requests], requests, steps, guidance)
        identitynet = method == "instantid"
        batch = [
            GenerationRequest(
                prompt_for(method, r, prompt),
                method=method,
                conditioning=self.conditioning(method, r.identity_id),
                seed=int(r.seed),
                scale=scale,
                steps=steps,
                guidance=guidance,
                width=self.size,
                height=self.size,
                keypoints=self._scene_keypoints(r) if identitynet and instantid_keypoints == "scene" else None,
                controlnet_scales=[identitynet_scale] if identitynet else None,
            )
            for r in requests
        ]
        results = self.engine.generate_batch(batch)
        return np.stack([np.asarray(result.images[0], dtype=np.uint8) for result in results])

    def _text_only(self, prompts: list[str], requests: list[Request], steps: int, guidance: float) -> np.ndarray:
        """The base model alone (the text baselines), through a call in which no adapter acts."""
        import torch

        from ..pipeline import base_model_images

        generators = [torch.Generator("cpu").manual_seed(int(r.seed)) for r in requests]
        images = base_model_images(
            self.base,
            prompts,
            negative_prompt=[""] * len(prompts),
            generator=generators,
            steps=steps,
            guidance=guidance,
            width=self.size,
            height=self.size,
            output_type="np",
        )
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)

    def _scene_keypoints(self, request: Request) -> np.ndarray:
        """Where the scene puts the face: the keypoints an InstantID user would give as the pose."""
        return np.asarray(render(request.identity, request.scene, self.size).kps)

    def _keypoint_image(self, request: Request, tokens, mode: str):
        """IdentityNet's condition: InstantID's keypoint drawing of where the face goes."""
        from ..multiperson import keypoint_image

        kps = self._scene_keypoints(request) if mode == "scene" else tokens.identities[0].kps
        return keypoint_image([np.asarray(kps)], (self.size, self.size))
