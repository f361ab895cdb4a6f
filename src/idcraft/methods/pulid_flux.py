"""PuLID-FLUX (FLUX.1-dev, ``pulid_flux_v0.9.x.safetensors``): face -> 32 ID tokens -> cross-attention
after every 2nd double and 4th single FLUX block. Defaults are the official app's (28 steps, guidance
embedding 4, ID weight 1, T5 length 128); ``--start-step`` and ``--true-cfg`` as officially.
"""

from __future__ import annotations

from typing import Any

from ..cancel import StepHook
from ..requests import GenerationRequest
from .base import FaceSettings, Family


class PulidFluxFamily(Family):
    name = "pulid-flux"
    options = frozenset(
        {"true_cfg", "start_step", "face_embeddings", "face_index", "aligned_faces", "face_parsings"}
    )
    defaults = {"steps": 28, "guidance": 4.0, "scale": 1.0}

    def load(
        self,
        base,
        adapter,
        image_encoder=None,
        *,
        device: str | None = None,
        dtype=None,
        offload: str | None = None,
        check_memory: bool = True,
        width: int | None = None,
        height: int | None = None,
        report=None,
        eva_clip=None,
        face_parser=None,
        **_: Any,
    ):
        from ..errors import IdcraftError
        from ..pulid.flux_pipeline import PulidFluxPipeline

        if image_encoder is not None:
            raise IdcraftError(
                "--image-encoder: pulid-flux reads faces with EVA02-CLIP; pass --eva-clip EVA02_CLIP_L_336_psz14_s6B.pt."
            )
        return PulidFluxPipeline.from_pretrained(
            base,
            adapter,
            device=device,
            dtype=dtype,
            offload=offload,
            check_memory=check_memory,
            width=width,
            height=height,
            report=report,
            eva_clip=eva_clip,
            face_parser=face_parser,
        )

    def fresh(self, model, method: str = "pulid-flux", **kwargs):
        """Fresh ID cross-attention for ``model`` (a FLUX transformer) around ``id_former`` (an IDFormer)."""
        from ..pulid.flux import PulidFluxInjection
        from ..pulid.flux_pipeline import PulidFluxAdapter

        id_former = kwargs["id_former"]
        injection = PulidFluxInjection.for_transformer(
            model, id_former.config.output_dim, heads=kwargs.get("heads", 16)
        )
        return PulidFluxAdapter(injection, id_former)

    def encode(self, pipe, request: GenerationRequest, faces: FaceSettings):
        from .pulid import face_stages

        return pipe.encode(face_stages(request, faces))

    def run(self, pipe, request: GenerationRequest, conditioning, on_step: StepHook | None = None) -> list:
        return pipe(
            request.prompt,
            conditioning,
            scale=request.scale,
            start_step=request.start_step,
            true_cfg=request.true_cfg,
            negative_prompt=request.negative_prompt,
            seed=request.seed,
            steps=request.steps,
            guidance=request.guidance,
            width=request.width,
            height=request.height,
            num_images=request.num_images,
            progress=request.progress,
            on_step=on_step,
        )


FAMILY = PulidFluxFamily()
