"""Generation: references + prompt -> images, on a diffusers SD1.5 / SDXL pipeline.

The algorithm, top to bottom (:meth:`IPAdapterPipeline.__call__`):

1. turn the references into image tokens (:mod:`idcraft.conditioning`): CLIP features of the images,
   or identity embeddings of the faces (plus CLIP features of the aligned face for FaceID-Plus), through
   the adapter's projection; the unconditional branch is built the way the official code builds it;
2. encode the prompt and negative prompt with the base pipeline's own text encoder(s);
3. append the image tokens to the text embeddings (negative image tokens to the negative text);
4. run the unchanged diffusers pipeline, whose attention layers now carry the adapter's processors
   (decoupled cross-attention, and LoRA for FaceID; see :mod:`idcraft.injection`).
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .adapter import IPAdapter
from .cancel import StepHook, diffusers_callback
from .conditioning import ReferenceTokens, identities_from_photos, identity_tokens, image_tokens
from .encoders import ClipImageEncoder
from .errors import IdcraftError
from .images import ImageInput, load_image
from .injection import adapter_call
from .models import (
    diffusers_dtype,
    load_base_pipeline,
    load_controlnet,
    load_image_encoder,
    meta_model,
    resolve_device,
    resolve_dtype,
)
from .multiperson import keypoint_image, place_faces, region_masks, regions_for
from .notices import drop_library_notices
from .prechecks import check_adapter_fits_base
from .requests import check_keypoints_inside

__all__ = ["BatchItem", "IPAdapterPipeline", "ReferenceTokens"]


@dataclass
class BatchItem:
    """One image of :meth:`IPAdapterPipeline.batch`: its prompt, reference tokens and noise seed, and for
    InstantID where its face goes (``keypoints``, output pixels) and any extra ControlNets' images."""

    prompt: str
    tokens: ReferenceTokens
    seed: int
    keypoints: np.ndarray | None = None
    control_images: Sequence[ImageInput] = ()


class IPAdapterPipeline:
    """A base diffusers pipeline, an :class:`IPAdapter` (any method of the IP-Adapter and FaceID
    families) and, where the method reads CLIP features, an image encoder, wired together.

    Build it with :meth:`from_pretrained` (paths or hub ids) or from objects you already hold.
    """

    def __init__(self, pipe, adapter: IPAdapter, encoder: ClipImageEncoder | None = None, controlnet=None):
        method = adapter.method
        if method.needs_image_encoder and encoder is None:
            raise IdcraftError(
                f"{method.name} reads CLIP image features: give an image encoder (--image-encoder)."
            )
        controlnets = _as_list(controlnet)
        if method.identitynet and not controlnets:
            raise IdcraftError(
                f"{method.name} needs its IdentityNet: pass --controlnet DIR, the ControlNetModel folder "
                "published with the InstantID adapter (InstantX/InstantID: ControlNetModel/)."
            )
        self.encoder = encoder
        self.adapter = adapter.to(device=pipe.device, dtype=pipe.unet.dtype).eval()
        adapter.check_compatible(
            pipe.unet, encoder.config if encoder is not None and method.feature else None
        )
        if controlnets:
            pipe = _controlnet_pipeline(pipe, controlnets)
        self.pipe = pipe
        self.is_sdxl = hasattr(pipe, "text_encoder_2")
        self.num_controlnets = len(controlnets)
        self.adapter.attach(pipe.unet, controlnets, merge_lora=True)

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        adapter: str | os.PathLike,
        image_encoder: str | os.PathLike | None = None,
        *,
        method: str | None = None,
        controlnet: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        shared: dict | None = None,
    ) -> IPAdapterPipeline:
        """Load everything, checking the adapter against the base model and encoder before returning.

        ``shared``: base pipelines and image encoders already loaded, by path, device and dtype; what this
        call loads is added to it, so pipelines built with one dict share one base model (each with its own
        adapter attached) and one image encoder per encoder folder."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        shared = {} if shared is None else shared
        check_adapter_fits_base(base, adapter)  # from the headers, before the adapter or encoder loads
        ip_adapter = IPAdapter.from_checkpoint(str(adapter), method=method)
        needs_encoder = ip_adapter.method.needs_image_encoder
        if needs_encoder and image_encoder is None:
            raise IdcraftError(
                f"{ip_adapter.method.name} reads CLIP image features: pass --image-encoder (the image_encoder "
                "folder published with the adapter)."
            )
        encoder = None
        if needs_encoder:
            key = ("image_encoder", str(image_encoder), str(dev), str(dt))
            if key not in shared:
                shared[key] = ClipImageEncoder(load_image_encoder(image_encoder, device=dev, dtype=dt))
            encoder = shared[key]
        names = {"base_name": f"base model {base}", "encoder_name": f"image encoder {image_encoder}"}
        encoder_config = encoder.config if encoder is not None else None
        key = ("base", str(base), str(dev), str(dt))
        if key not in shared:
            if _is_local_dir(base):  # fail in milliseconds, before loading gigabytes
                ip_adapter.check_compatible(_meta_unet(base), encoder_config, **names)
            shared[key] = load_base_pipeline(base, device=dev, dtype=dt)
        pipe = shared[key]
        ip_adapter.check_compatible(pipe.unet, encoder_config, **names)
        controlnets = [load_controlnet(c, device=dev, dtype=dt) for c in _as_list(controlnet)]
        return cls(pipe, ip_adapter, encoder, controlnet=controlnets or None)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def method(self):
        return self.adapter.method

    def encode_references(
        self,
        references: Sequence[ImageInput] = (),
        *,
        face_embeddings: Sequence[np.ndarray] | None = None,
        s_scale: float = 1.0,
        face_backend: str = "insightface",
        face_models: str | None = None,
        face_index: int | None = None,
        multi_person: bool = False,
    ) -> ReferenceTokens:
        """References -> image tokens, as the method needs them.

        CLIP methods: each image gives its own tokens, side by side. Face methods: identity embeddings
        from ``face_embeddings`` (raw, as the recogniser gives them) or from face analysis of the
        references with ``face_backend`` (an ArcFace recogniser is required); several photos are one
        person (see :func:`idcraft.conditioning.identity_tokens`) unless ``multi_person``: then each photo
        (or, with one photo, each face in it) is a different person, placed in its own region.
        """
        images = [load_image(r) for r in references]
        if not self.method.needs_face:
            if not images:
                raise IdcraftError(f"{self.method.name} needs at least one reference image.")
            return image_tokens(self.adapter, self.encoder, images)
        identities = identities_from_photos(
            self.method,
            images,
            face_embeddings,
            face_backend=face_backend,
            face_models=face_models,
            face_index=face_index,
            every_face=multi_person and len(images) == 1,
            resize=self.is_sdxl,  # InstantID's rule is for SDXL; an SD1.5-shaped base keeps the photo's size
        )
        return identity_tokens(
            self.adapter, identities, self.encoder, s_scale=s_scale, per_person=multi_person
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        reference: ImageInput | Sequence[ImageInput] | None = None,
        *,
        tokens: ReferenceTokens | None = None,
        face_embedding: np.ndarray | Sequence[np.ndarray] | None = None,
        s_scale: float = 1.0,
        negative_prompt: str = "",
        scale: float = 1.0,
        seed: int | None = None,
        steps: int = 30,
        guidance: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        control_image: ImageInput | Sequence[ImageInput] | None = None,
        controlnet_scale: float | Sequence[float] = 1.0,
        keypoints: np.ndarray | None = None,
        progress: bool = True,
        on_step: StepHook | None = None,
    ) -> list[Image.Image]:
        """Generate ``num_images`` images of the reference subject following ``prompt``.

        The subject comes from ``reference`` (one or several images), ``face_embedding`` (FaceID,
        InstantID), or precomputed ``tokens``. ``seed`` seeds ``torch.Generator("cpu")``, so a seed gives
        the same initial latents as diffusers and the official code.

        InstantID: IdentityNet's condition is the keypoint image drawn from ``keypoints`` (5 ``[x, y]`` in
        output pixels) or else from the reference's own keypoints, in which case the output takes the
        reference's size after InstantID's resize rule unless ``width``/``height`` say otherwise.
        ``control_image`` then lists the images of any extra ControlNets.

        ``on_step(done, total)`` is called before the first step and after every step (see
        :func:`idcraft.cancel.step_hook`); what it raises (:class:`~idcraft.errors.Cancelled`) ends the call.
        """
        if tokens is None:
            refs = (
                []
                if reference is None
                else (
                    [reference]
                    if isinstance(reference, (str, os.PathLike, Image.Image, np.ndarray))
                    else list(reference)
                )
            )
            embeddings = None
            if face_embedding is not None:
                embeddings = [face_embedding] if np.ndim(face_embedding) == 1 else list(face_embedding)
            tokens = self.encode_references(refs, face_embeddings=embeddings, s_scale=s_scale)
        faces, canvas = None, None
        if self.method.identitynet or self._several_people(tokens):
            faces, canvas = self._face_layout(keypoints, tokens, width, height)
            width, height = canvas
        regions = self._regions(tokens, faces, canvas) if self._several_people(tokens) else None
        state = self.adapter.call_state(scale, tokens.num_tokens, regions)
        embeds = self._prompt_embeddings(prompt, negative_prompt, tokens, num_images)
        extra = self._controlnet_inputs(control_image, controlnet_scale, faces, canvas)
        runner = request_view(self.pipe, progress=progress)
        generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
        if on_step is not None:
            on_step(0, steps)
        with adapter_call(self.adapter.layout, state):
            return runner(
                **embeds,
                guidance_scale=guidance,
                num_inference_steps=steps,
                generator=generator,
                width=width,
                height=height,
                **extra,
                **diffusers_callback(on_step, steps),
            ).images

    @torch.no_grad()
    def batch(
        self,
        items: Sequence[BatchItem],
        *,
        negative_prompt: str = "",
        scale: float = 1.0,
        steps: int = 30,
        guidance: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        controlnet_scale: float | Sequence[float] = 1.0,
        output_type: str = "pil",
        progress: bool = False,
        on_step: StepHook | None = None,
    ) -> list:
        """One image for each item (its own prompt, reference tokens, seed and keypoints) in one pipeline
        call: what batch jobs and evaluations run on a GPU. Each item draws its noise from its own
        ``torch.Generator("cpu")``, so its image does not depend on the rest of the batch. The items'
        tokens must have the same length; several people per image are generated one call each."""
        if not items:
            return []
        counts = {item.tokens.num_tokens for item in items}
        if len(counts) != 1 or any(self._several_people(item.tokens) for item in items):
            raise IdcraftError(
                "a batch needs the same number of image tokens for every item and one person per image; "
                "generate such requests one at a time."
            )
        layouts = [
            self._face_layout(item.keypoints, item.tokens, width, height)
            if self.method.identitynet
            else (None, None)
            for item in items
        ]
        canvases = {canvas for _, canvas in layouts}
        if len(canvases) > 1:
            raise IdcraftError(f"the items of a batch must share one output size, got {sorted(canvases)}.")
        canvas = canvases.pop()
        if canvas is not None:
            width, height = canvas
        text = encode_text(self.pipe, [item.prompt for item in items], [negative_prompt] * len(items))
        cond = torch.cat([item.tokens.cond for item in items])
        uncond = torch.cat([item.tokens.uncond for item in items])
        embeds = {
            **text,
            "prompt_embeds": _append(text["prompt_embeds"], cond, 1),
            "negative_prompt_embeds": _append(text["negative_prompt_embeds"], uncond, 1),
        }
        extra = {}
        if self.num_controlnets:
            per_item = [
                self._controlnet_inputs(item.control_images, controlnet_scale, faces, canvas)
                for item, (faces, canvas) in zip(items, layouts, strict=True)
            ]
            extra = {"controlnet_conditioning_scale": per_item[0]["controlnet_conditioning_scale"]}
            if self.num_controlnets == 1:
                extra["image"] = [e["image"] for e in per_item]
            else:
                extra["image"] = [[e["image"][k] for e in per_item] for k in range(self.num_controlnets)]
        runner = request_view(self.pipe, progress=progress)
        generators = [torch.Generator("cpu").manual_seed(int(item.seed)) for item in items]
        state = self.adapter.call_state(scale, counts.pop())
        if on_step is not None:
            on_step(0, steps)
        with adapter_call(self.adapter.layout, state):
            return runner(
                **embeds,
                guidance_scale=guidance,
                num_inference_steps=steps,
                generator=generators,
                width=width,
                height=height,
                output_type=output_type,
                **extra,
                **diffusers_callback(on_step, steps),
            ).images

    def _prompt_embeddings(self, prompt, negative_prompt, tokens: ReferenceTokens, num_images: int) -> dict:
        """The base pipeline's text embeddings with the image tokens appended (negative to negative)."""
        text = encode_text(self.pipe, prompt, negative_prompt, num_images)
        return {
            **text,
            "prompt_embeds": _append(text["prompt_embeds"], tokens.cond, num_images),
            "negative_prompt_embeds": _append(text["negative_prompt_embeds"], tokens.uncond, num_images),
        }

    def _controlnet_inputs(self, control_image, controlnet_scale, faces, canvas) -> dict:
        """ControlNet condition images and scales; InstantID's keypoint image comes first (IdentityNet)."""
        if not self.num_controlnets:
            return {}
        images = [load_image(c) for c in _as_list(control_image)]
        if self.method.identitynet:
            images = [keypoint_image(faces, canvas), *images]
        if len(images) != self.num_controlnets:
            drawn = " (IdentityNet's keypoint image is drawn for you)" if self.method.identitynet else ""
            raise IdcraftError(
                f"{self.num_controlnets} ControlNet(s) but {len(images)} condition image(s): give one "
                f"--control-image per --controlnet{drawn}."
            )
        scales = (
            list(controlnet_scale)
            if isinstance(controlnet_scale, Sequence)
            else [controlnet_scale] * len(images)
        )
        if len(scales) != len(images):
            raise IdcraftError(
                f"{len(scales)} ControlNet scale(s) for {len(images)} ControlNet(s): give one each."
            )
        if len(images) == 1:
            return {"image": images[0], "controlnet_conditioning_scale": scales[0]}
        return {"image": images, "controlnet_conditioning_scale": scales}

    @staticmethod
    def _several_people(tokens: ReferenceTokens) -> bool:
        return tokens.per_person and len(tokens.identities or []) > 1

    def _regions(self, tokens: ReferenceTokens, faces: list[np.ndarray], canvas: tuple[int, int]) -> list:
        """One region per person, at latent resolution, each owning its person's span of tokens."""
        if len(faces) != len(tokens.identities):
            raise IdcraftError(f"{len(faces)} face position(s) for {len(tokens.identities)} people.")
        width, height = canvas
        grid = (height // self.pipe.vae_scale_factor, width // self.pipe.vae_scale_factor)
        per_person = tokens.num_tokens // len(tokens.identities)
        return regions_for(per_person, region_masks(faces, canvas, grid))

    def _face_layout(
        self, keypoints, tokens: ReferenceTokens, width: int | None, height: int | None
    ) -> tuple[list[np.ndarray], tuple[int, int]]:
        """Where each face goes in the output: a list of 5x2 keypoints in output pixels, and the output size.

        Given ``keypoints`` (one face ``[5, 2]`` or several ``[N, 5, 2]``) are in output pixels. Otherwise
        the references' own keypoints are used: faces from one photo keep their places (scaled to the
        output size); faces from separate photos are set side by side (:func:`idcraft.multiperson.place_faces`).
        Without ``width``/``height`` the output takes the (first) reference's size.
        """
        if keypoints is not None:
            kps = np.asarray(keypoints).reshape(-1, 5, 2)  # as given: draw_kps computes in their dtype
            if width is None or height is None:
                raise IdcraftError("--keypoints are in output pixels: give --width and --height with them.")
            check_keypoints_inside(kps, (width, height), "the output")
            return list(kps), (width, height)
        identities = tokens.identities or []
        if not identities or any(i.kps is None for i in identities):
            raise IdcraftError(
                f"{self.method.name} needs to know where the face goes: give a --reference photo or "
                "--keypoints FILE.json (five [x, y] in output pixels per face)."
            )
        frames = [tuple(i.image_size) for i in identities]
        if not self.method.identitynet:  # FaceID: the base model's native size, not the photo's
            native = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
            width, height = width or native, height or native
        canvas = (width or frames[0][0], height or frames[0][1])
        if len({i.photo for i in identities}) > 1:
            return place_faces([i.kps for i in identities], frames, canvas), canvas
        if canvas == frames[0]:  # the reference's own keypoints, unchanged (dtype too), as InstantID draws them
            return [np.asarray(i.kps) for i in identities], canvas
        scale = np.array([canvas[0] / frames[0][0], canvas[1] / frames[0][1]])
        return [np.asarray(i.kps) * scale for i in identities], canvas


def encode_text(pipe, prompt, negative_prompt, num_images: int = 1) -> dict:
    """``pipe``'s own text embeddings of ``prompt`` and ``negative_prompt`` (strings or lists), as the
    keyword arguments its call takes (``prompt_embeds``, ``negative_prompt_embeds`` and, for SDXL, the
    pooled ones), encoded under :func:`text_lock`."""
    with text_lock(pipe):
        text = pipe.encode_prompt(
            prompt=prompt,
            device=pipe._execution_device,
            num_images_per_prompt=num_images,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt,
        )
    embeds = {"prompt_embeds": text[0], "negative_prompt_embeds": text[1]}
    if hasattr(pipe, "text_encoder_2"):
        embeds.update(pooled_prompt_embeds=text[2], negative_pooled_prompt_embeds=text[3])
    return embeds


@torch.no_grad()
def base_model_images(
    pipe,
    prompt: str | list[str],
    *,
    negative_prompt: str | list[str] = "",
    generator: torch.Generator | list[torch.Generator] | None = None,
    steps: int = 30,
    guidance: float = 7.5,
    width: int | None = None,
    height: int | None = None,
    num_images: int = 1,
    output_type: str = "pil",
    progress: bool = False,
    on_step: StepHook | None = None,
):
    """The base diffusers pipeline ``pipe`` alone, whatever adapters are attached to its UNet: a call in
    which no adapter acts (:func:`~idcraft.injection.adapter_call` ``(None)``) on a per-call view of the
    pipeline, so it runs beside adapter calls on the same models. Text-only generation and the world's
    text baselines draw with it; its images are those of the same pipeline with no adapter attached.
    ``on_step`` as for :meth:`IPAdapterPipeline.__call__` (progress, cancellation)."""
    if on_step is not None:
        on_step(0, steps)
    with adapter_call(None):
        return request_view(pipe, progress=progress)(
            **encode_text(pipe, prompt, negative_prompt, num_images),
            guidance_scale=guidance,
            num_inference_steps=steps,
            generator=generator,
            width=width,
            height=height,
            output_type=output_type,
            **diffusers_callback(on_step, steps),
        ).images


def _append(text: torch.Tensor, image_tokens: torch.Tensor, num_images: int) -> torch.Tensor:
    image_tokens = image_tokens.to(device=text.device, dtype=text.dtype).repeat(num_images, 1, 1)
    return torch.cat([text, image_tokens], dim=1)


_TEXT_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TEXT_LOCKS_GUARD = threading.Lock()


def text_lock(pipe) -> threading.Lock:
    """The lock to hold while ``pipe`` tokenizes and encodes text.

    A Hugging Face fast tokenizer sets padding and truncation on its one shared Rust object at every
    call, so two requests tokenizing at once on one pipeline can each get the other's settings (and a
    prompt encoded unpadded). Text encoding takes milliseconds; holding one lock per tokenizer for it
    keeps requests apart while their denoising runs in parallel."""
    key = getattr(pipe, "tokenizer", None) or pipe
    with _TEXT_LOCKS_GUARD:
        if key not in _TEXT_LOCKS:
            _TEXT_LOCKS[key] = threading.Lock()
        return _TEXT_LOCKS[key]


def request_view(pipe, *, progress: bool = False):
    """A pipeline of the same class sharing ``pipe``'s models but with a scheduler of its own.

    diffusers pipelines keep a call's state on themselves and their scheduler (timesteps, step index,
    guidance scale, current timestep), so two requests running at once on one pipeline would overwrite each
    other's. A view per call costs microseconds and shares every weight."""
    import inspect

    params = inspect.signature(type(pipe).__init__).parameters
    components = {k: v for k, v in pipe.components.items() if k in params}
    components["scheduler"] = copy.deepcopy(pipe.scheduler)
    options = {k: v for k, v in pipe.config.items() if k in params and k not in components}
    view = type(pipe)(**components, **options)
    for name in ("_all_hooks", "_offload_device", "_offload_gpu_id"):  # CPU offloading, if enabled
        if hasattr(pipe, name):
            setattr(view, name, getattr(pipe, name))
    view.set_progress_bar_config(disable=not progress)
    return view


def _as_list(value) -> list:
    if value is None:
        return []
    if hasattr(value, "nets"):  # a diffusers MultiControlNetModel
        return list(value.nets)
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _controlnet_pipeline(pipe, controlnets: list):
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    cls = (
        StableDiffusionXLControlNetPipeline
        if hasattr(pipe, "text_encoder_2")
        else StableDiffusionControlNetPipeline
    )
    # torch_dtype: without it from_pipe moves every component to float32, upcasting a float16/bfloat16
    # UNet, VAE and ControlNet while the adapter stays in half precision (dtype mismatch at to_k_ip)
    drop_library_notices()  # from_pipe casts each component to its own dtype; diffusers warns anyway
    return cls.from_pipe(
        pipe,
        controlnet=controlnets[0] if len(controlnets) == 1 else controlnets,
        **diffusers_dtype(pipe.unet.dtype),
    )


def _is_local_dir(path) -> bool:
    return os.path.isdir(os.path.join(str(path), "unet"))


def _meta_unet(base):
    from diffusers import UNet2DConditionModel

    return meta_model(UNet2DConditionModel, base, "unet")
