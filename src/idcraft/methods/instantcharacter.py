"""InstantCharacter (FLUX.1): SigLIP + DINOv2 features of one reference -> a projector whose tokens follow
the timestep -> subject attention in every FLUX block. Defaults are the official ones (28 steps, FLUX's
guidance embedding 3.5, subject scale 0.8); ``true_cfg`` above 1 adds a negative pass per step.
"""

from __future__ import annotations

from typing import Any

from ..cancel import StepHook
from ..errors import IdcraftError
from ..requests import GenerationRequest
from .base import FaceSettings, Family


class InstantCharacterFamily(Family):
    name = "instantcharacter"
    options = frozenset({"true_cfg"})
    defaults = {"steps": 28, "guidance": 3.5, "scale": 0.8}

    def load(
        self,
        base,
        adapter,
        image_encoder=None,
        *,
        image_encoder_2=None,
        device: str | None = None,
        dtype=None,
        offload: str | None = None,
        check_memory: bool = True,
        width: int | None = None,
        height: int | None = None,
        report=None,
        **_: Any,
    ):
        from ..instantcharacter.pipeline import InstantCharacterPipeline

        if image_encoder is None or image_encoder_2 is None:
            raise IdcraftError(
                "instantcharacter reads the reference with two encoders: pass --image-encoder SIGLIP_DIR "
                "(google/siglip-so400m-patch14-384) and --image-encoder-2 DINOV2_DIR (facebook/dinov2-giant)."
            )
        return InstantCharacterPipeline.from_pretrained(
            base,
            adapter,
            image_encoder,
            image_encoder_2,
            device=device,
            dtype=dtype,
            offload=offload,
            check_memory=check_memory,
            width=width,
            height=height,
            report=report,
        )

    def fresh(self, model, method: str = "instantcharacter", **kwargs):
        """A freshly initialised adapter for ``model`` (a FLUX transformer); ``config=`` a ProjectorConfig."""
        from ..instantcharacter.adapter import InstantCharacterAdapter

        return InstantCharacterAdapter.for_transformer(model, kwargs["config"])

    def encode(self, pipe, request: GenerationRequest, faces: FaceSettings):
        if len(request.references) != 1:
            raise IdcraftError(
                f"instantcharacter takes one reference image ({len(request.references)} given)."
            )
        return pipe.encode_reference(request.references[0])

    def run(self, pipe, request: GenerationRequest, conditioning, on_step: StepHook | None = None) -> list:
        return pipe(
            request.prompt,
            features=conditioning,
            scale=request.scale,
            seed=request.seed,
            steps=request.steps,
            guidance=request.guidance,
            true_cfg=request.true_cfg,
            negative_prompt=request.negative_prompt or None,
            width=request.width,
            height=request.height,
            num_images=request.num_images,
            progress=request.progress,
            on_step=on_step,
        )


FAMILY = InstantCharacterFamily()
