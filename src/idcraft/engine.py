"""The one entry point for generation: load models once, then ``engine.generate(request) -> result``.

:class:`Engine` holds one loaded pipeline per method (several methods may share one base model) and
dispatches every :class:`~idcraft.requests.GenerationRequest` to its method's family
(:mod:`idcraft.methods`): check the request, turn its references into conditioning, run the pipeline.
The command line, the server, batch jobs and the offline world's evaluation all call it.

Nothing about a request is stored on the engine or its models: scale, token counts, regions and the
scheduler's state travel with the call (:func:`idcraft.injection.adapter_call`,
:func:`idcraft.pipeline.request_view`), so threads may call :meth:`Engine.generate` at once on one engine
and each gets exactly the images it would get alone. Conditioning (:meth:`Engine.encode`) can be computed
once and reused across prompts, seeds and scales -- the server's identity cache keeps it.

    >>> engine = Engine.from_pretrained("./stable-diffusion-v1-5", "./ip-adapter_sd15.bin", "./image_encoder")
    >>> result = engine.generate(GenerationRequest("a dog on the moon", references=["dog.jpg"], seed=1))
    >>> result.images[0].save("dog_moon.png")
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .cancel import CancelToken, Progress, step_hook
from .errors import IdcraftError
from .methods import FaceSettings, family_of
from .methods.text_only import TEXT_ONLY, is_text_only
from .registry import Method, get_method
from .requests import GenerationRequest, GenerationResult, Limits, not_a_request

__all__ = ["CancelToken", "Conditioning", "Engine", "GenerationRequest", "GenerationResult", "Limits"]

#: Families that run on FLUX.1 and take ``offload``.
FLUX_FAMILIES = ("instantcharacter", "infiniteyou", "pulid-flux")
#: Families that read ``eva_clip`` / ``face_parser``.
PULID_FAMILIES = ("pulid", "pulid-flux")


@dataclass(frozen=True)
class Conditioning:
    """A request's references turned into what its method reads (image tokens, identity tokens, or
    InstantCharacter's encoder features), tagged with the method that made them."""

    method: str
    value: Any


class Engine:
    """Loaded pipelines by method, and generation through them (see the module docstring).

    Build it with :meth:`from_pretrained` (one method from paths or hub ids) or from pipelines you hold:
    ``Engine({"ip-adapter": ip_pipe, "faceid": faceid_pipe})``. Method ``none`` (text-only: no reference,
    the base model alone) runs on the base model the SD methods share, or on a plain diffusers pipeline
    given as ``{"none": pipe}``. ``face_backend``/``face_models`` say how
    faces are found in reference photos (an ArcFace recogniser for the official face methods);
    ``defaults`` override the methods' defaults for settings a request leaves out.
    """

    def __init__(
        self,
        pipelines: Mapping[str, Any] | Sequence[Any],
        *,
        face_backend: str = "insightface",
        face_models: str | os.PathLike | None = None,
        limits: Limits | None = None,
        defaults: Mapping[str, Any] | None = None,
    ):
        if not isinstance(pipelines, Mapping):
            pipelines = {_method_of(p).name: p for p in pipelines}
        if not pipelines:
            raise IdcraftError("an engine needs at least one loaded method.")
        self._pipelines: dict[str, Any] = {}
        for name, pipe in pipelines.items():
            method = _lookup(name)
            if _method_of(pipe).name != method.name:
                raise IdcraftError(f"the pipeline given for {method.name} runs {_method_of(pipe).name}.")
            self._pipelines[method.name] = pipe
        self.faces = FaceSettings(face_backend, face_models)
        self.limits = limits or Limits()
        #: Settings a request leaves at ``None`` get these before the method's own defaults (a small base
        #: model may want fewer steps, say).
        self.defaults = dict(defaults or {})
        # Offloading moves weights between devices around a call: such pipelines take one call at a time.
        self._locks = {name: threading.Lock() for name, pipe in self._pipelines.items() if _offloads(pipe)}
        self._text_base: Any = None  # the base pipeline text-only requests draw with, found when first used

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        adapter: str | os.PathLike | None,
        image_encoder: str | os.PathLike | None = None,
        *,
        method: str | None = None,
        image_encoder_2: str | os.PathLike | None = None,
        controlnet: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        model_version: str | None = None,
        loras: Sequence[tuple[str, float]] = (),
        device: str | None = None,
        dtype: Any = None,
        offload: str | None = None,
        check_memory: bool = True,
        width: int | None = None,
        height: int | None = None,
        report: Any = None,
        face_backend: str = "insightface",
        face_models: str | os.PathLike | None = None,
        limits: Limits | None = None,
        eva_clip: str | os.PathLike | None = None,
        face_parser: str | os.PathLike | None = None,
    ) -> Engine:
        """Load one method: a base model (SD1.5, SDXL or FLUX.1), its adapter file in the official layout
        and the encoders it reads; the method comes from ``method`` or the files. Everything is checked
        against everything else before the base model's weights are read. ``method="none"`` with
        ``adapter=None`` loads the base model alone (text-only generation)."""
        chosen = _choose_method(method, base, image_encoder_2, adapter)
        if adapter is None and chosen is not TEXT_ONLY:
            raise IdcraftError(
                "give the adapter file (--adapter), or --method none for the base model alone."
            )
        family = family_of(chosen) if chosen is not None else family_of("ip-adapter")
        if family.name != "instantcharacter" and image_encoder_2:
            raise IdcraftError("--image-encoder-2: used by instantcharacter (FLUX.1) only.")
        if family.name not in FLUX_FAMILIES and offload not in (None, "none"):
            raise IdcraftError(
                f"--offload {offload}: used by the FLUX.1 methods only ({', '.join(FLUX_FAMILIES)})."
            )
        if family.name != "infiniteyou" and (model_version or loras):
            raise IdcraftError(f"{'--model-version' if model_version else '--lora'}: used by infiniteyou only.")
        extra = {"model_version": model_version, "loras": tuple(loras)} if family.name == "infiniteyou" else {}
        pipe = family.load(
            base,
            adapter,
            image_encoder,
            method=None if chosen is None else chosen.name,
            image_encoder_2=image_encoder_2,
            controlnet=controlnet,
            device=device,
            dtype=dtype,
            offload=offload,
            check_memory=check_memory,
            width=width,
            height=height,
            report=report,
            **extra,
            **_pulid_files(chosen, eva_clip, face_parser),
        )
        return cls([pipe], face_backend=face_backend, face_models=face_models, limits=limits)

    # ------------------------------------------------------------------ what is loaded
    @property
    def methods(self) -> tuple[str, ...]:
        """The loaded methods (``none`` only when given as a pipeline of its own; see :attr:`text_only`)."""
        return tuple(self._pipelines)

    @property
    def text_only(self) -> bool:
        """Whether method ``none`` (the prompt alone, every adapter off) runs here: an SD base is loaded."""
        return TEXT_ONLY.name in self._pipelines or any(
            _method_of(p).base == "sd" for p in self._pipelines.values()
        )

    def pipeline(self, method: str | None = None):
        """The loaded pipeline of ``method`` (default: the engine's only method); for ``none``, the base
        diffusers pipeline."""
        return self._pipeline_of(self._method_name(method))

    def size_multiple(self, method: str | None = None) -> int:
        """Output sides of ``method`` must be multiples of this (its base model's VAE and latent packing)."""
        return _size_factor(self.pipeline(method))

    def _pipeline_of(self, name: str):
        if name in self._pipelines:
            return self._pipelines[name]
        if self._text_base is None:
            self._text_base = _base_pipeline(self._pipelines.values())
        from .adapter import merged_lora_method

        merged = merged_lora_method(self._text_base.unet)
        if merged is not None:
            raise IdcraftError(
                f"method none needs the base model's own weights, but {merged}'s LoRA is merged into them "
                f"(it is the only adapter on this base): load the base alone for text-only generation."
            )
        return self._text_base

    def _method_name(self, requested: str | None) -> str:
        if is_text_only(requested):
            if not self.text_only:
                raise IdcraftError(
                    "method none (text-only) runs on an SD1.5/SDXL base, and none is loaded here "
                    f"({', '.join(self.methods)}): give a reference."
                )
            return TEXT_ONLY.name
        if requested is None:
            if len(self._pipelines) > 1:
                raise IdcraftError(
                    f"this engine serves several methods: name one of {', '.join(self.methods)}."
                )
            return next(iter(self._pipelines))
        name = get_method(requested).name
        if name not in self._pipelines:
            raise IdcraftError(f"method {name!r} is not loaded here; loaded: {', '.join(self.methods)}.")
        return name

    def prepare(self, request: GenerationRequest) -> tuple[Method, GenerationRequest]:
        """The request's method and the request with that method's defaults, checked: an unknown method,
        an option the method does not read, or a size the base model cannot make is refused here."""
        if not isinstance(request, GenerationRequest):
            raise not_a_request(request)
        request.validate(self.limits)
        name = self._method_name(request.method)
        method = _lookup(name)
        family = family_of(method)
        family.check(method, request)
        request = replace(request, method=name).with_defaults({**family.defaults, **self.defaults})
        factor = _size_factor(self._pipeline_of(name))
        for side in ("width", "height"):
            value = getattr(request, side)
            if value is not None and value % factor:
                raise IdcraftError(
                    f"--{side} {value} is not a multiple of {factor}, which {name}'s base model needs "
                    f"(try {max(factor, value // factor * factor)})."
                )
        if request.steps is not None:  # the sides a request leaves out: the base's native size
            native = _native_side(self._pipeline_of(name))
            self.limits.check_cost(
                request.width or native, request.height or native, request.steps, request.num_images
            )
        return method, request

    # ------------------------------------------------------------------ generation
    def encode(self, request: GenerationRequest) -> Conditioning:
        """The request's references (or face embeddings) as its method's conditioning; reuse it across
        requests with ``GenerationRequest(conditioning=...)`` to skip the encoders and face analysis."""
        method, request = self.prepare(request)
        return self._encode(method, request)

    def _encode(self, method: Method, request: GenerationRequest) -> Conditioning:
        if request.conditioning is not None:
            given = request.conditioning
            if isinstance(given, Conditioning):
                if given.method != method.name:
                    raise IdcraftError(
                        f"the conditioning was made for {given.method}, not {method.name}: encode the "
                        "references with this method."
                    )
                return given
            return Conditioning(method.name, given)
        value = family_of(method).encode(self._pipeline_of(method.name), request, self.faces)
        return Conditioning(method.name, value)

    def generate(
        self,
        request: GenerationRequest,
        *,
        cancel: CancelToken | None = None,
        progress: Progress | None = None,
    ) -> GenerationResult:
        """Run one request: its images, and the seed, settings, timings and warnings that went with them.

        ``cancel``: once set (from any thread), the call stops at its next denoising step with
        :class:`~idcraft.errors.Cancelled`. ``progress(done, total)`` is called before the first step and
        after each one, from this thread. Both belong to this call alone."""
        start = time.perf_counter()
        method, request = self.prepare(request)
        if request.seed is None:
            request = replace(request, seed=secrets.randbits(63))
        family = family_of(method)
        pipe = self._pipeline_of(method.name)
        hook = step_hook(cancel, progress)
        with self._lock(method.name):
            _check(cancel)
            conditioning = self._encode(method, request)
            encoded = time.perf_counter()
            images = family.run(pipe, request, conditioning.value, hook)
        done = time.perf_counter()
        return GenerationResult(
            images=list(images),
            method=method.name,
            seed=request.seed,
            settings=_settings(request),
            timings={
                "encode_s": 0.0 if request.conditioning is not None else encoded - start,
                "generate_s": done - encoded,
                "total_s": done - start,
            },
            warnings=family.warnings(pipe, request),
        )

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        cancel: CancelToken | None = None,
        progress: Progress | None = None,
    ) -> list[GenerationResult]:
        """One image for each request, the requests run together in one pipeline call where the method
        allows it (SD families: same method, size and settings, one image and one person each; each
        request's noise comes from its own seed, so its image does not depend on the batch). Anything
        else runs one request at a time. ``cancel`` and ``progress`` as for :meth:`generate` (requests
        run one at a time report each one's steps)."""
        if isinstance(requests, (GenerationRequest, Mapping, str)) or not isinstance(requests, Sequence):
            raise IdcraftError(
                f"generate_batch takes a list of GenerationRequest, got {type(requests).__name__}; "
                "for one request call generate()."
            )
        if not requests:
            return []
        start = time.perf_counter()
        prepared = [self.prepare(r) for r in requests]
        method = prepared[0][0]
        family = family_of(method)
        shared = {batch_key(r) for _, r in prepared}  # prepared requests carry their method's name
        if (
            len(shared) > 1
            or not hasattr(family, "run_batch")  # the SD families
            or requests[0].num_images != 1
            or requests[0].multi_person  # several people: regions per image, one call each
        ):
            return [self.generate(r, cancel=cancel, progress=progress) for r in requests]
        ready = [replace(r, seed=secrets.randbits(63)) if r.seed is None else r for _, r in prepared]
        pipe = self._pipeline_of(method.name)
        with self._lock(method.name):
            _check(cancel)
            conditionings = [self._encode(method, r).value for r in ready]
            encoded = time.perf_counter()
            images = family.run_batch(pipe, ready, conditionings, step_hook(cancel, progress))
        done = time.perf_counter()
        timings = {"encode_s": encoded - start, "generate_s": done - encoded, "total_s": done - start}
        return [
            GenerationResult(
                [image], method.name, r.seed, _settings(r), dict(timings), family.warnings(pipe, r)
            )
            for image, r in zip(images, ready, strict=True)
        ]

    def _lock(self, method: str):
        return self._locks.get(method) or contextlib.nullcontext()


def _lookup(name: str) -> Method:
    return TEXT_ONLY if is_text_only(name) else get_method(name)


def _check(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.check()


def _method_of(pipe) -> Method:
    method = getattr(pipe, "method", None)
    if isinstance(method, Method):
        return method
    if type(pipe).__name__ == "InstantCharacterPipeline":
        return get_method("instantcharacter")
    if hasattr(pipe, "unet") and hasattr(pipe, "encode_prompt"):  # a diffusers SD pipeline: the base alone
        return TEXT_ONLY
    raise IdcraftError(f"{type(pipe).__name__} is not an idcraft pipeline.")


def _base_pipeline(pipelines) -> Any:
    """The base diffusers pipeline the SD methods draw with (IdentityNet's ControlNet left out): text-only
    requests run on it, with no adapter acting."""
    sd = [p for p in pipelines if _method_of(p).base == "sd"]
    for pipe in sd:
        if _method_of(pipe) is TEXT_ONLY:
            return pipe
    for pipe in sd:
        if not getattr(pipe, "num_controlnets", 0):
            return pipe.pipe
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    inner = sd[0].pipe  # only ControlNet pipelines (InstantID): the same models without the ControlNet
    cls = StableDiffusionXLPipeline if hasattr(inner, "text_encoder_2") else StableDiffusionPipeline
    return cls.from_pipe(inner, torch_dtype=inner.unet.dtype)


def _offloads(pipe) -> bool:
    return getattr(pipe, "offload", "none") not in (None, "none")


def _size_factor(pipe) -> int:
    """Output sides must be multiples of this: 8 for diffusers' SD pipelines (or the VAE's factor when
    larger), twice the VAE's factor for FLUX's packed latents."""
    inner = getattr(pipe, "pipe", pipe)
    factor = int(getattr(inner, "vae_scale_factor", 8))
    return factor * 2 if _method_of(pipe).base == "flux" else max(8, factor)


def _native_side(pipe) -> int:
    """The side a base model generates when a request gives none (512 for SD1.5, 1024 for SDXL and FLUX)."""
    inner = getattr(pipe, "pipe", pipe)
    unet = getattr(inner, "unet", None)
    sample = getattr(getattr(unet, "config", None), "sample_size", None) or getattr(
        inner, "default_sample_size", 64
    )
    return int(sample) * int(getattr(inner, "vae_scale_factor", 8))


def _pulid_files(method: Method | None, eva_clip, face_parser) -> dict[str, Any]:
    """PuLID's encoder files, refused for other methods (a silent no-op would hide a mistake)."""
    given = {k: v for k, v in (("eva_clip", eva_clip), ("face_parser", face_parser)) if v is not None}
    if given and (method is None or method.family not in PULID_FAMILIES):
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise IdcraftError(f"{flags}: used by pulid only (the PuLID methods: {', '.join(PULID_FAMILIES)}).")
    return given


def _choose_method(method: str | None, base, image_encoder_2, adapter=None) -> Method | None:
    """The requested method, else what the files say (:func:`method_from_files`); ``None`` lets the SD
    loader detect the method from the adapter file."""
    if method is not None:
        return _lookup(method)
    name = method_from_files(adapter, base, image_encoder_2)
    return None if name is None else get_method(name)


def method_from_files(adapter, base, image_encoder_2=None) -> str | None:
    """The method the files imply, known without torch or a model: InfiniteYou for its release folder;
    PuLID (SDXL) or PuLID-FLUX when the adapter's tensor names say so; InstantCharacter for a FLUX base
    folder or a DINOv2 encoder; ``None`` otherwise. An SDXL PuLID file with a FLUX base is refused here,
    naming both."""
    from .infiniteyou.release import is_release

    if adapter is not None and image_encoder_2 is None and is_release(adapter):
        return "infiniteyou"
    kind = adapter_kind(adapter) if adapter is not None else None
    flux = _is_flux_folder(base)
    if kind == "pulid-flux":
        return "pulid-flux"
    if kind == "pulid" and flux:
        from .errors import IncompatibleAdapterError

        raise IncompatibleAdapterError(
            f"{adapter} is a PuLID SDXL file (id_adapter.*), but base model {base} is FLUX.1: use an SDXL base "
            "with it, or pulid_flux_v0.9.x.safetensors (--method pulid-flux) on FLUX."
        )
    if kind == "pulid":
        return "pulid"
    if flux or image_encoder_2 is not None:
        return "instantcharacter"
    return None


def _is_flux_folder(base) -> bool:
    """Whether ``base`` is a local FLUX pipeline folder (its model_index.json says so; no imports)."""
    import json
    from pathlib import Path

    try:
        index = json.loads((Path(base) / "model_index.json").read_text())
    except (OSError, ValueError, TypeError):
        return False
    return isinstance(index, dict) and str(index.get("_class_name", "")).startswith("Flux")


def adapter_kind(adapter) -> str | None:
    """``"pulid-flux"`` / ``"pulid"`` when a local adapter file is a PuLID release (read from its tensor
    names only; ``.safetensors`` headers without torch), else ``None`` (the SD loader detects the rest)."""
    from pathlib import Path

    from .registry import pulid_kind, safetensors_keys

    path = Path(adapter)
    if not path.is_file():
        return None
    keys = safetensors_keys(path)
    if keys is None and path.suffix != ".safetensors":
        from .errors import CheckpointError
        from .pulid.flux_pipeline import read_release

        try:
            keys = list(read_release(path))
        except CheckpointError:
            return None
    return pulid_kind(keys or [])


def batch_key(request: GenerationRequest) -> tuple:
    """Requests with equal keys can run in one pipeline call (:meth:`Engine.generate_batch`): the same
    method and every setting but the prompt, references and seed."""
    return (
        request.method,
        request.negative_prompt,
        request.scale,
        request.steps,
        request.guidance,
        request.width,
        request.height,
        tuple(request.controlnet_scales or ()),
        request.num_images,
        request.multi_person,
    )


def _settings(request: GenerationRequest) -> dict[str, Any]:
    keep = (
        "method",
        "prompt",
        "negative_prompt",
        "scale",
        "seed",
        "steps",
        "guidance",
        "width",
        "height",
        "num_images",
        "s_scale",
        "true_cfg",
        "infusenet_start",
        "infusenet_end",
        "multi_person",
        "face_index",
        "num_zero",
        "ortho",
        "sampler",
    )
    return {k: getattr(request, k) for k in keep}
