"""Request bodies of the HTTP API (pydantic): the OpenAI images shape plus idcraft's own fields.

Unknown fields are refused (400), as the engine refuses options a method does not read: a misspelt
``guidence`` must not silently fall back to the default.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ImageRequest(BaseModel):
    """``POST /v1/images/generations``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    #: images to make (OpenAI's name for ``num_images``)
    n: int = 1
    #: ``"WxH"``; left out: the method's default (the base model's native size)
    size: str | None = None
    #: only ``b64_json``: images come back inline
    response_format: str = "b64_json"
    #: left out: a random seed, reported in the answer
    seed: int | None = None
    #: the idcraft method; ``model`` (OpenAI's field) is read when ``method`` is left out
    method: str | None = None
    model: str | None = None
    #: base64 images (raw or ``data:`` URLs) or ids from ``POST /v1/references``
    references: list[str] = Field(default_factory=list)
    negative_prompt: str | None = None
    scale: float | None = None
    steps: int | None = None
    guidance: float | None = None
    keypoints: Any = None
    multi_person: bool = False
    #: which face of each reference (0 = largest); left out, a photo with several faces is refused (422)
    face_index: int | None = None
    s_scale: float | None = None
    #: InstantID: weight of IdentityNet (its ControlNet: where the face goes and how it is drawn); 1.0 default
    identitynet_scale: float | None = None
    true_cfg: float = 1.0
    #: infiniteyou: the InfuseNet guidance window, fractions of the steps
    infusenet_start: float = 0.0
    infusenet_end: float = 1.0
    #: pulid-flux: the first denoising step that sees the identity
    start_step: int = 0
    #: pulid: zero tokens, ortho rule (off/v1/v2), sampler (dpmpp_2m/dpmpp_sde); left out: the method's defaults
    num_zero: int | None = None
    ortho: str | None = None
    sampler: str | None = None
    #: pulid, pulid-flux (and the face methods' embeddings): PuLID's stage inputs, one per face in reference
    #: order (see .stages): embeddings as base64 .npy or a list of 512 numbers; aligned faces (512x512) and
    #: label maps as base64 PNGs or ids from ``POST /v1/references``
    face_embeddings: list[str | list[float]] | None = None
    aligned_faces: list[str] | None = None
    face_parsings: list[str] | None = None
    #: OpenAI's end-user id: accepted, not used
    user: str | None = None
    #: OpenAI's ``quality`` and ``style`` (sent by many wrappers): accepted, ignored, with a warning
    quality: str | None = None
    style: str | None = None


class ReferenceUpload(BaseModel):
    """``POST /v1/references`` as JSON (multipart form data with a ``file`` field works too)."""

    model_config = ConfigDict(extra="forbid")

    image: str
