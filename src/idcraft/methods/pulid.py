"""PuLID v1.1 on SDXL: faces -> EVA02-CLIP + ArcFace -> IDFormer ID tokens -> ID attention beside attn2.

A reference photo is analysed with the engine's face backend (antelopev2 gives the RAW embedding PuLID
reads and the keypoints the face is aligned with). Each later stage can be handed over instead:
``--face-embedding`` (raw 512-d), ``--aligned-face`` (512x512, skips detection and alignment),
``--face-parsing`` (label map, skips BiSeNet). Several faces (photos) give one set of tokens, the faces'
inputs concatenated as official. Defaults are the official app's (Juggernaut: 25 steps, CFG 7, ID scale
0.8, 20 zero tokens, ortho v2, DPM++ 2M Karras).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..cancel import StepHook
from ..errors import IdcraftError
from ..requests import GenerationRequest
from .base import FaceSettings, Family


class PulidFamily(Family):
    name = "pulid"
    options = frozenset(
        {"face_embeddings", "face_index", "aligned_faces", "face_parsings", "num_zero", "ortho", "sampler"}
    )
    defaults = {
        "steps": 25,
        "guidance": 7.0,
        "scale": 0.8,
        "num_zero": 20,
        "ortho": "v2",
        "sampler": "dpmpp_2m",
    }

    def load(
        self,
        base,
        adapter,
        image_encoder=None,
        *,
        eva_clip=None,
        face_parser=None,
        device: str | None = None,
        dtype=None,
        controlnet=None,
        **_: Any,
    ):
        from ..pulid.pipeline import PulidSDXLPipeline

        if image_encoder is not None:
            raise IdcraftError(
                "pulid reads faces with EVA02-CLIP: give it as --eva-clip, not --image-encoder."
            )
        if controlnet:
            raise IdcraftError("--controlnet: not used by pulid.")
        return PulidSDXLPipeline.from_pretrained(
            base, adapter, eva_clip=eva_clip, face_parser=face_parser, device=device, dtype=dtype
        )

    def fresh(self, model, method: str = "pulid", **kwargs):
        """Fresh IDFormer + ID attention for a UNet (training); ``config=`` the IDFormer's settings."""
        from ..pulid.idformer import IDFormer
        from ..pulid.sdxl import IDAttention

        idformer = IDFormer(**kwargs.get("config", {}))
        return idformer, IDAttention(model, idformer.config.output_dim)

    def encode(self, pipe, request: GenerationRequest, faces: FaceSettings):
        return pipe.encode(face_stages(request, faces))

    def run(self, pipe, request: GenerationRequest, conditioning, on_step: StepHook | None = None) -> list:
        return pipe(
            request.prompt,
            conditioning,
            negative_prompt=request.negative_prompt,
            scale=request.scale,
            num_zero=request.num_zero,
            ortho=request.ortho,
            sampler=request.sampler,
            seed=request.seed,
            steps=request.steps,
            guidance=request.guidance,
            width=request.width,
            height=request.height,
            num_images=request.num_images,
            progress=on_step,
        )


def _image_array(source) -> np.ndarray:
    from ..images import load_image

    return np.asarray(load_image(source))


def face_stages(request: GenerationRequest, faces: FaceSettings) -> list:
    """One :class:`~idcraft.pulid.encoder.FaceStages` per reference face, from whatever the request holds:
    photos (analysed here), raw embeddings, aligned faces and label maps, matched by position."""
    from ..pulid.encoder import FaceStages
    from ..pulid.preprocess import check_aligned, read_label_map

    photos = list(request.references)
    embeddings = list(request.face_embeddings or [])
    aligned = list(request.aligned_faces or [])
    parsings = list(request.face_parsings or [])
    count = max(len(photos), len(embeddings), len(aligned))
    if count == 0:
        raise IdcraftError(
            "pulid needs a reference photo with a face, or --face-embedding with --aligned-face for each face."
        )
    for flag, given in (
        ("--face-embedding", embeddings),
        ("--aligned-face", aligned),
        ("--face-parsing", parsings),
    ):
        if given and len(given) != count:
            raise IdcraftError(
                f"{len(given)} {flag} given for {count} faces: give one per face, in --reference order."
            )
    stages = []
    for i in range(count):
        stage = FaceStages(
            embedding=embeddings[i] if embeddings else None,
            aligned_face=check_aligned(_image_array(aligned[i]), "--aligned-face") if aligned else None,
            parsing=read_label_map(parsings[i]) if parsings else None,
        )
        needs_detection = stage.embedding is None or stage.aligned_face is None
        if needs_detection:
            if not photos:
                missing = "--face-embedding" if stage.embedding is None else "--aligned-face"
                raise IdcraftError(
                    f"pulid: give the reference photo (--reference) or {missing} for every face."
                )
            _detect(stage, photos[i], request.face_index, faces)
        stages.append(stage)
    return stages


def _detect(stage, photo, face_index: int | None, faces: FaceSettings) -> None:
    """Fill the embedding (antelopev2, raw) and the photo + keypoints for alignment from face analysis."""
    from ..faces import analyse_reference, require_arcface
    from ..faces.analyser import image_name

    image = _image_array(photo)
    face = analyse_reference(
        image, faces.backend, face_index, models_dir=faces.models, name=image_name(photo)
    )
    if stage.embedding is None:
        stage.embedding = require_arcface(face, "pulid")
    stage.photo, stage.kps = image, face.kps


FAMILY = PulidFamily()
