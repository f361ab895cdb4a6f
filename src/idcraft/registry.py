"""The one place that maps a method name to its parts.

A :class:`Method` names, for one adapter family member, which image-encoder output it reads, which
projection turns that into tokens, how the unconditional (classifier-free guidance) branch is built, and
what its official checkpoint looks like. Everything else (loading, generation, the command line) looks
methods up here; adding a variant is adding an entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .errors import CheckpointError, IdcraftError

Feature = Literal["pooled", "penultimate"]
Uncond = Literal["zero-embeds", "zero-image"]


@dataclass(frozen=True)
class Method:
    """One adapter method.

    Attributes:
        name: the ``--method`` name.
        projection: key into :data:`idcraft.projections.PROJECTIONS`.
        feature: ``"pooled"`` = ``CLIPVisionModelWithProjection(...).image_embeds`` (projected pooled
            embedding); ``"penultimate"`` = ``hidden_states[-2]`` (all patch tokens of the second-to-last
            layer, the fine-grained features of Plus and Full-face).
        uncond: how the negative image tokens for classifier-free guidance are made, as in the official
            code: ``"zero-embeds"`` projects an all-zero embedding; ``"zero-image"`` runs an all-zero
            (already normalised) pixel tensor through the encoder and projects that.
        checkpoints: official file names this method loads (documentation and ``--method`` aliases).
    """

    name: str
    projection: str
    feature: Feature
    uncond: Uncond
    description: str
    checkpoints: tuple[str, ...] = ()
    aliases: tuple[str, ...] = field(default=())


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            name="ip-adapter",
            projection="linear",
            feature="pooled",
            uncond="zero-embeds",
            description="IP-Adapter: pooled CLIP image embedding -> 4 tokens (linear + LayerNorm).",
            checkpoints=(
                "ip-adapter_sd15.bin",
                "ip-adapter_sd15_light.bin",
                "ip-adapter_sd15_vit-G.bin",
                "ip-adapter_sdxl.bin",
                "ip-adapter_sdxl_vit-h.bin",
            ),
            aliases=("ipadapter", "ip-adapter_sd15", "ip-adapter_sd15_light", "ip-adapter-light",
                     "ip-adapter_sd15_vit-g", "ip-adapter_sdxl", "ip-adapter_sdxl_vit-h"),
        ),
        Method(
            name="ip-adapter-plus",
            projection="resampler",
            feature="penultimate",
            uncond="zero-image",
            description="IP-Adapter-Plus: CLIP patch features -> 16 tokens through a Perceiver Resampler.",
            checkpoints=("ip-adapter-plus_sd15.bin", "ip-adapter-plus_sdxl_vit-h.bin"),
            aliases=("ip-adapter-plus_sd15", "ip-adapter-plus_sdxl_vit-h"),
        ),
        Method(
            name="ip-adapter-plus-face",
            projection="resampler",
            feature="penultimate",
            uncond="zero-image",
            description="IP-Adapter-Plus-Face: the Plus architecture trained on face crops; use a cropped face.",
            checkpoints=("ip-adapter-plus-face_sd15.bin", "ip-adapter-plus-face_sdxl_vit-h.bin"),
            aliases=("ip-adapter-plus-face_sd15", "ip-adapter-plus-face_sdxl_vit-h"),
        ),
        Method(
            name="ip-adapter-full-face",
            projection="mlp",
            feature="penultimate",
            uncond="zero-image",
            description="IP-Adapter-Full-face: every CLIP patch token -> one token through an MLP (257 tokens).",
            checkpoints=("ip-adapter-full-face_sd15.bin",),
            aliases=("ip-adapter-full-face_sd15", "ip-adapter-full"),
        ),
    )
}

_ALIASES: dict[str, str] = {
    alias.lower(): m.name for m in METHODS.values() for alias in (m.name, *m.aliases)
}


def get_method(name: str) -> Method:
    """Look a method up by name or alias (official file stems work too), case-insensitively."""
    key = name.lower().removesuffix(".bin").removesuffix(".safetensors")
    if key not in _ALIASES:
        raise IdcraftError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}.")
    return METHODS[_ALIASES[key]]


def projection_kind(image_proj: Mapping[str, object]) -> str:
    """Which projection family an ``image_proj`` state dict was saved from, judged by its key names."""
    keys = set(image_proj)
    if "latents" in keys and "proj_in.weight" in keys:
        return "resampler"
    if {"proj.0.weight", "proj.2.weight", "proj.3.weight"} <= keys:
        return "mlp"
    if {"proj.weight", "norm.weight"} <= keys:
        return "linear"
    if {"proj.0.weight", "proj.2.weight", "norm.weight"} <= keys:
        raise CheckpointError(
            "this is an IP-Adapter-FaceID checkpoint (MLP projection of a face-recognition embedding); "
            "FaceID methods are not supported by this version of idcraft yet."
        )
    raise CheckpointError(
        f"image_proj keys {sorted(keys)[:8]} match no known IP-Adapter projection "
        "(linear ImageProjModel, Full-face MLP or Perceiver Resampler)."
    )


def detect_method(image_proj: Mapping[str, object], ip_adapter: Mapping[str, object]) -> Method:
    """The method an official checkpoint was saved from, as far as its keys tell.

    Keys cannot tell Plus from Plus-Face (same architecture, different training data) nor SD1.5 from
    its "light" variant: those resolve to ``ip-adapter-plus`` / ``ip-adapter``, which compute exactly the
    same thing; pass ``method=`` to label them otherwise.
    """
    if any("lora" in k for k in ip_adapter):
        raise CheckpointError(
            "this checkpoint carries LoRA weights (an IP-Adapter-FaceID file); FaceID methods are not "
            "supported by this version of idcraft yet."
        )
    kind = projection_kind(image_proj)
    shape = getattr(image_proj.get("proj_in.weight"), "shape", None)
    if kind == "resampler" and shape is not None and shape[1] == 512:
        raise CheckpointError(
            "this Resampler reads a 512-d face embedding (an InstantID or FaceID-Portrait-unnorm file); "
            "those methods are not supported by this version of idcraft yet."
        )
    return next(m for m in METHODS.values() if m.projection == kind)


def resolve_method(requested: str | None, image_proj: Mapping[str, object], ip_adapter: Mapping[str, object]) -> Method:
    """``requested`` if given and consistent with the checkpoint's keys, else the detected method."""
    detected = detect_method(image_proj, ip_adapter)
    if requested is None:
        return detected
    method = get_method(requested)
    if method.projection != detected.projection:
        raise CheckpointError(
            f"--method {method.name} expects a {method.projection} projection, but the checkpoint holds a "
            f"{detected.projection} projection (a {detected.name} file). Use --method {detected.name}, "
            "or leave --method out to detect it."
        )
    return method
