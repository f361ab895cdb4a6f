"""InfiniteYou (FLUX.1): an ArcFace embedding -> 8 identity tokens -> InfuseNet residuals in every FLUX
block, the text path untouched. Defaults are the official ones (30 steps, FLUX guidance 3.5, InfuseNet
scale 1.0 over all steps, 864 x 1152); ``true_cfg`` != 1 with a negative prompt adds a negative pass per
step without InfuseNet. The control image is drawn from ``keypoints`` (output pixels) or the face of a
``--control-image`` pose photo fitted into the output frame; without either it is all black.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..cancel import StepHook
from ..errors import IdcraftError
from ..requests import GenerationRequest
from .base import FaceSettings, Family


@dataclass(frozen=True)
class Identity:
    """One request's identity tokens, and the engine's face settings (for finding the face of a pose photo
    when the request has one)."""

    tokens: Any
    faces: FaceSettings


class InfiniteYouFamily(Family):
    name = "infiniteyou"
    options = frozenset(
        {
            "true_cfg",
            "face_embeddings",
            "face_index",
            "keypoints",
            "control_images",
            "infusenet_start",
            "infusenet_end",
        }
    )
    defaults = {"steps": 30, "guidance": 3.5, "scale": 1.0, "width": 864, "height": 1152}

    def load(
        self,
        base,
        adapter,
        image_encoder=None,
        *,
        controlnet=None,
        model_version: str | None = None,
        loras=(),
        device: str | None = None,
        dtype=None,
        offload: str | None = None,
        check_memory: bool = True,
        width: int | None = None,
        height: int | None = None,
        report=None,
        **_: Any,
    ):
        from ..infiniteyou.pipeline import InfiniteYouPipeline

        if image_encoder is not None:
            raise IdcraftError("--image-encoder: infiniteyou reads faces, not CLIP features; leave it out.")
        nets = controlnet if isinstance(controlnet, (list, tuple)) else [controlnet] if controlnet else []
        if len(nets) > 1:
            raise IdcraftError("infiniteyou takes one --controlnet: its InfuseNet folder.")
        return InfiniteYouPipeline.from_pretrained(
            base,
            adapter,
            infusenet=nets[0] if nets else None,
            model_version=model_version,
            device=device,
            dtype=dtype,
            offload=offload,
            check_memory=check_memory,
            width=width,
            height=height,
            loras=loras,
            report=report,
        )

    def fresh(self, model, method: str = "infiniteyou", **kwargs):
        """A fresh InfuseNet + Resampler for ``model`` (a FLUX transformer), as training starts."""
        from ..infiniteyou.fresh import fresh_models

        return fresh_models(model, **kwargs)

    def encode(self, pipe, request: GenerationRequest, faces: FaceSettings):
        """The identity tokens of the request's face: a given embedding, or the face of the reference."""
        if request.face_embeddings:
            from ..faces import average_embeddings, require_arcface

            vectors = [require_arcface(e, "InfiniteYou") for e in request.face_embeddings]
            # One embedding is used as given (as official); several are averaged on the unit sphere.
            vector = vectors[0] if len(vectors) == 1 else average_embeddings(vectors, normalize=True)
            return Identity(pipe.identity_tokens(vector), faces)
        if not request.references:
            raise IdcraftError(
                "infiniteyou needs a reference photo with a face (or a saved --face-embedding)."
            )
        from ..infiniteyou.recognition import identity_embedding

        embeddings = [
            identity_embedding(r, faces.backend, faces.models, request.face_index) for r in request.references
        ]
        from ..faces import average_embeddings

        vector = embeddings[0] if len(embeddings) == 1 else average_embeddings(embeddings, normalize=True)
        return Identity(pipe.identity_tokens(vector), faces)

    def run(self, pipe, request: GenerationRequest, conditioning, on_step: StepHook | None = None) -> list:
        keypoints = request.keypoints
        if request.control_images:
            if len(request.control_images) != 1 or keypoints is not None:
                raise IdcraftError(
                    "infiniteyou takes one pose: one --control-image (its face's keypoints are drawn) or --keypoints."
                )
            keypoints = _pose_keypoints(request, conditioning.faces)
        if keypoints is not None:
            keypoints = np.asarray(keypoints)  # its own dtype: draw_kps truncates in it, as official
        return pipe(
            request.prompt,
            tokens=conditioning.tokens,
            keypoints=keypoints,
            scale=request.scale,
            start=request.infusenet_start,
            end=request.infusenet_end,
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


def _pose_keypoints(request: GenerationRequest, faces: FaceSettings) -> np.ndarray:
    """The largest face's keypoints in the pose photo after the official fit into the output frame."""
    from ..faces import analyse_reference
    from ..images import load_image
    from ..infiniteyou.control import resize_and_pad

    frame = resize_and_pad(load_image(request.control_images[0]), request.width, request.height)
    face = analyse_reference(frame, faces.backend, 0, models_dir=faces.models, embed=False)
    return np.asarray(face.kps)


FAMILY = InfiniteYouFamily()
