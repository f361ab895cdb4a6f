"""Text-only generation: the prompt alone, on the base model with every adapter off (method ``none``).

Not an adapter method, so not in :data:`idcraft.registry.METHODS` (nothing to load, detect or train):
:data:`TEXT_ONLY` is its :class:`~idcraft.registry.Method` and :data:`FAMILY` runs it. The engine gives it
the base diffusers pipeline its adapter pipelines share (:meth:`idcraft.engine.Engine.pipeline`), and
:func:`idcraft.pipeline.base_model_images` runs that with no adapter acting -- the same images the
pipeline draws with no adapter attached, next to adapter requests on the same models. It is what a
request with no reference asks for, and the reference point an adapter's effect is measured against.
"""

from __future__ import annotations

from typing import Any

from ..cancel import StepHook
from ..errors import IdcraftError
from ..registry import Method
from ..requests import GenerationRequest
from .base import FaceSettings, Family, prompt_warnings

#: The method of text-only generation (``--method none``; ``base`` and ``text-only`` are aliases).
TEXT_ONLY = Method(
    name="none",
    projection="none",
    feature=None,
    uncond="zero-embeds",
    description="No adapter: the base model draws the prompt alone (no reference).",
    aliases=("base", "text-only"),
    family="none",
)


def is_text_only(name: str | None) -> bool:
    """Whether ``name`` names text-only generation (``none``, ``base``, ``text-only``, any case)."""
    return name is not None and name.lower() in (TEXT_ONLY.name, *TEXT_ONLY.aliases)


class TextOnlyFamily(Family):
    name = "none"
    defaults: dict[str, Any] = {"steps": 30, "guidance": 7.5}

    def load(self, base, adapter=None, image_encoder=None, *, device=None, dtype=None, **_: Any):
        """The base model alone (SD1.5 or SDXL diffusers folder / hub id); no adapter file is read."""
        if adapter is not None:
            raise IdcraftError("--method none draws with the base model alone: leave out --adapter.")
        from ..models import load_base_pipeline, resolve_device, resolve_dtype

        dev = resolve_device(device)
        return load_base_pipeline(base, device=dev, dtype=resolve_dtype(dtype, dev))

    def check(self, method: Method, request: GenerationRequest) -> None:
        super().check(method, request)
        if request.references or request.face_embeddings or request.conditioning is not None:
            raise IdcraftError(
                "method none draws from the prompt alone: leave out the references, or name an adapter "
                "method to use them."
            )
        if request.scale is not None:
            raise IdcraftError("--scale: not used by none (there is no adapter to weigh).")

    def encode(self, pipe, request: GenerationRequest, faces: FaceSettings):
        return None

    def run(self, pipe, request: GenerationRequest, conditioning, on_step: StepHook | None = None) -> list:
        import torch

        from ..pipeline import base_model_images

        generator = torch.Generator("cpu").manual_seed(request.seed) if request.seed is not None else None
        return base_model_images(
            pipe,
            request.prompt,
            negative_prompt=request.negative_prompt,
            generator=generator,
            steps=request.steps,
            guidance=request.guidance,
            width=request.width,
            height=request.height,
            num_images=request.num_images,
            progress=request.progress,
            on_step=on_step,
        )

    def warnings(self, pipe, request: GenerationRequest) -> list[str]:
        return prompt_warnings(pipe, request)


FAMILY = TextOnlyFamily()
