"""What every method family provides to the engine, and the part the SD families share.

A family is a small object with four jobs: load a pipeline from official files (:meth:`Family.load`), make
a fresh adapter for training (:meth:`Family.fresh`), turn a request's references into conditioning
(:meth:`Family.encode`) and run the pipeline for a request (:meth:`Family.run`). It also says which
request options it reads (:attr:`Family.options`) and its defaults, so the engine refuses an option a
method would silently ignore. The three SD families share :class:`SDFamily`, over
:class:`idcraft.pipeline.IPAdapterPipeline`; each adds only what is its own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..cancel import StepHook
from ..errors import IdcraftError
from ..registry import Method
from ..requests import METHOD_OPTIONS, GenerationRequest


@dataclass(frozen=True)
class FaceSettings:
    """How the engine finds faces in reference photos (its face backend and models), shared by requests."""

    backend: str = "insightface"
    models: str | os.PathLike | None = None


class Family:
    """The interface of a method family (see the module docstring)."""

    name: ClassVar[str]
    #: Request options (beyond the common ones) this family reads.
    options: ClassVar[frozenset[str]] = frozenset()
    #: Settings a request leaves at ``None`` get these.
    defaults: ClassVar[dict[str, Any]] = {"steps": 30, "guidance": 7.5, "scale": 1.0}

    def load(self, base, adapter, image_encoder=None, **kwargs):
        raise NotImplementedError

    def fresh(self, model, method: str, **kwargs):
        raise NotImplementedError

    def encode(self, pipe, request: GenerationRequest, faces: FaceSettings):
        raise NotImplementedError

    def run(self, pipe, request: GenerationRequest, conditioning, on_step: StepHook | None = None) -> list:
        """The request's images; ``on_step(done, total)`` is called around every denoising step (it stops
        the call by raising :class:`~idcraft.errors.Cancelled`)."""
        raise NotImplementedError

    def check(self, method: Method, request: GenerationRequest) -> None:
        """Refuse options this method does not read, naming them (a silent no-op hides a mistake)."""
        unused = [
            "--" + name.replace("_", "-")
            for name, default in METHOD_OPTIONS.items()
            if name not in self.allowed(method) and _given(getattr(request, name), default)
        ]
        if unused:
            raise IdcraftError(f"{', '.join(unused)}: not used by {method.name}.")

    def allowed(self, method: Method) -> frozenset[str]:
        return self.options

    def warnings(self, pipe, request: GenerationRequest) -> list[str]:
        return []


def _given(value: Any, default: Any) -> bool:
    if isinstance(value, (list, tuple)) and not value and not default:
        return False
    return value is not None and value != default


class SDFamily(Family):
    """SD1.5 / SDXL methods on :class:`~idcraft.pipeline.IPAdapterPipeline`."""

    options = frozenset({"control_images", "controlnet_scales"})

    def load(
        self,
        base,
        adapter,
        image_encoder=None,
        *,
        method: str | None = None,
        controlnet=None,
        device: str | None = None,
        dtype=None,
        **_: Any,
    ):
        from ..pipeline import IPAdapterPipeline

        return IPAdapterPipeline.from_pretrained(
            base, adapter, image_encoder, method=method, controlnet=controlnet, device=device, dtype=dtype
        )

    def fresh(self, model, method: str, **kwargs):
        """A freshly initialised adapter for ``model`` (a UNet), as the official training scripts start."""
        from ..adapter import IPAdapter

        return IPAdapter.for_unet(model, method, **kwargs)

    def _references(self, request: GenerationRequest) -> list:
        from ..images import load_image

        return [load_image(r) for r in request.references]

    def run(self, pipe, request: GenerationRequest, conditioning, on_step: StepHook | None = None) -> list:
        scales = list(request.controlnet_scales) if request.controlnet_scales else 1.0
        return pipe(
            request.prompt,
            tokens=conditioning,
            negative_prompt=request.negative_prompt,
            scale=request.scale,
            seed=request.seed,
            steps=request.steps,
            guidance=request.guidance,
            width=request.width,
            height=request.height,
            num_images=request.num_images,
            control_image=list(request.control_images),
            controlnet_scale=scales,
            keypoints=request.keypoints,
            progress=request.progress,
            on_step=on_step,
        )

    def run_batch(
        self,
        pipe,
        requests: Sequence[GenerationRequest],
        conditionings: Sequence,
        on_step: StepHook | None = None,
    ) -> list:
        """One image per request in one pipeline call (requests share method, size and settings)."""
        from ..pipeline import BatchItem

        first = requests[0]
        items = [
            BatchItem(r.prompt, c, r.seed, r.keypoints, list(r.control_images))
            for r, c in zip(requests, conditionings, strict=True)
        ]
        return pipe.batch(
            items,
            negative_prompt=first.negative_prompt,
            scale=first.scale,
            steps=first.steps,
            guidance=first.guidance,
            width=first.width,
            height=first.height,
            controlnet_scale=list(first.controlnet_scales) if first.controlnet_scales else 1.0,
            progress=first.progress,
            on_step=on_step,
        )

    def warnings(self, pipe, request: GenerationRequest) -> list[str]:
        return prompt_warnings(pipe.pipe, request)


def prompt_warnings(pipe, request: GenerationRequest) -> list[str]:
    """A prompt longer than the text encoder of ``pipe`` (a diffusers pipeline) reads is cut there: say so
    rather than drop it silently."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return []
    from ..pipeline import text_lock

    limit = tokenizer.model_max_length
    out = []
    for what, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
        with text_lock(pipe):
            count = len(tokenizer(text).input_ids) if text else 0
        if count > limit:
            out.append(
                f"the {what} is {count} tokens; the text encoder reads {limit}, so the rest is ignored."
            )
    return out


class IdentityFamily(SDFamily):
    """Shared by the face families: identities from photos (face analysis) or saved embeddings."""

    options = SDFamily.options | {"face_embeddings", "face_index", "multi_person", "keypoints"}

    def encode(self, pipe, request: GenerationRequest, faces: FaceSettings):
        references = self._references(request)
        embeddings = None
        if request.face_embeddings is not None:
            from ..inputs import load_embedding

            embeddings = [
                load_embedding(os.fspath(e)) if isinstance(e, (str, os.PathLike)) else e
                for e in request.face_embeddings
            ]
        if not references and not embeddings:
            raise IdcraftError(
                f"{pipe.method.name} needs a reference photo with a face (or a saved --face-embedding)."
            )
        return pipe.encode_references(
            references,
            face_embeddings=embeddings,
            s_scale=request.s_scale,
            face_backend=faces.backend,
            face_models=None if faces.models is None else str(faces.models),
            face_index=request.face_index,
            multi_person=request.multi_person,
        )
