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
Uncond = Literal["zero-embeds", "zero-image", "same-tokens"]
Inputs = Literal["image", "face", "face+image"]
Combine = Literal["side-by-side", "average"]
Base = Literal["sd", "flux"]
Family = Literal[
    "ip-adapter", "faceid", "instantid", "instantcharacter", "infiniteyou", "pulid", "pulid-flux", "none"
]


@dataclass(frozen=True)
class Method:
    """One adapter method.

    Attributes:
        name: the ``--method`` name.
        projection: key into :data:`idcraft.projections.PROJECTIONS` (FLUX methods: the name of their
            own projector, :mod:`idcraft.instantcharacter.projector`).
        inputs: what a reference becomes before projection: ``"image"`` = CLIP features of the whole
            image; ``"face"`` = a face-recognition (ArcFace) identity embedding; ``"face+image"`` = the
            identity embedding plus CLIP features of the aligned face crop (FaceID-Plus).
        feature: which CLIP output is read: ``"pooled"`` = ``image_embeds`` (projected pooled embedding);
            ``"penultimate"`` = ``hidden_states[-2]`` (all patch tokens of the second-to-last layer).
        uncond: how the CLIP part of the negative (classifier-free guidance) tokens is made, as in the
            official code: ``"zero-embeds"`` projects all-zero features; ``"zero-image"`` runs an all-zero
            (already normalised) pixel tensor through the encoder. Identity embeddings are always zeroed.
        normalize_embedding: L2-normalise the identity embedding first (FaceID does, InstantID does not).
        shortcut: FaceID-PlusV2 adds the identity tokens back to the perceiver output (``--s-scale``).
        combine: several references: ``"side-by-side"`` gives each its own tokens; ``"average"`` averages
            the identity embeddings (one person, several photos) into one set of tokens.
        lora: the checkpoint carries LoRA for every attention layer of the UNet.
        identitynet: the method runs with a ControlNet (InstantID's IdentityNet) that reads the facial
            keypoint image as its condition and the identity tokens, not the text, as its context.
        checkpoints: official file names this method loads (documentation and ``--method`` aliases).
        base: the base model family, which decides the pipeline that runs the method: ``"sd"`` (SD1.5 /
            SDXL UNet, :class:`idcraft.pipeline.IPAdapterPipeline`) or ``"flux"`` (FLUX.1 transformer,
            :class:`idcraft.instantcharacter.pipeline.InstantCharacterPipeline`).
        family: the component that loads and runs it (:mod:`idcraft.methods`): ``"ip-adapter"``,
            ``"faceid"``, ``"instantid"`` or ``"instantcharacter"``.
    """

    name: str
    projection: str
    feature: Feature | None
    uncond: Uncond
    description: str
    inputs: Inputs = "image"
    normalize_embedding: bool = False
    shortcut: bool = False
    combine: Combine = "side-by-side"
    lora: bool = False
    identitynet: bool = False
    checkpoints: tuple[str, ...] = ()
    aliases: tuple[str, ...] = field(default=())
    base: Base = "sd"
    family: Family = "ip-adapter"

    @property
    def needs_face(self) -> bool:
        return self.inputs != "image"

    @property
    def needs_image_encoder(self) -> bool:
        return self.inputs != "face"


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
            aliases=(
                "ipadapter",
                "ip-adapter_sd15",
                "ip-adapter_sd15_light",
                "ip-adapter-light",
                "ip-adapter_sd15_vit-g",
                "ip-adapter_sdxl",
                "ip-adapter_sdxl_vit-h",
            ),
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
        Method(
            name="faceid",
            family="faceid",
            projection="faceid-mlp",
            feature=None,
            uncond="zero-embeds",
            inputs="face",
            normalize_embedding=True,
            combine="average",
            lora=True,
            description="IP-Adapter-FaceID: L2-normalised ArcFace embedding -> 4 tokens, LoRA on every attention layer.",
            checkpoints=("ip-adapter-faceid_sd15.bin", "ip-adapter-faceid_sdxl.bin"),
            aliases=("ip-adapter-faceid", "ip-adapter-faceid_sd15", "ip-adapter-faceid_sdxl"),
        ),
        Method(
            name="faceid-plus",
            family="faceid",
            projection="faceid-plus",
            feature="penultimate",
            uncond="zero-image",
            inputs="face+image",
            normalize_embedding=True,
            combine="average",
            lora=True,
            description="IP-Adapter-FaceID-Plus: identity tokens query CLIP features of the aligned face crop; LoRA.",
            checkpoints=("ip-adapter-faceid-plus_sd15.bin",),
            aliases=("ip-adapter-faceid-plus", "ip-adapter-faceid-plus_sd15"),
        ),
        Method(
            name="faceid-plusv2",
            family="faceid",
            projection="faceid-plus",
            feature="penultimate",
            uncond="zero-image",
            inputs="face+image",
            normalize_embedding=True,
            shortcut=True,
            combine="average",
            lora=True,
            description="IP-Adapter-FaceID-PlusV2: FaceID-Plus with the identity tokens added back (--s-scale).",
            checkpoints=("ip-adapter-faceid-plusv2_sd15.bin", "ip-adapter-faceid-plusv2_sdxl.bin"),
            aliases=(
                "ip-adapter-faceid-plusv2",
                "ip-adapter-faceid-plusv2_sd15",
                "ip-adapter-faceid-plusv2_sdxl",
            ),
        ),
        Method(
            name="faceid-portrait",
            family="faceid",
            projection="faceid-mlp",
            feature=None,
            uncond="zero-embeds",
            inputs="face",
            normalize_embedding=True,
            description="IP-Adapter-FaceID-Portrait: 16 tokens per reference photo (up to 5, side by side), no LoRA.",
            checkpoints=(
                "ip-adapter-faceid-portrait_sd15.bin",
                "ip-adapter-faceid-portrait-v11_sd15.bin",
                "ip-adapter-faceid-portrait_sdxl.bin",
            ),
            aliases=(
                "ip-adapter-faceid-portrait",
                "ip-adapter-faceid-portrait_sd15",
                "ip-adapter-faceid-portrait-v11_sd15",
                "ip-adapter-faceid-portrait_sdxl",
            ),
        ),
        Method(
            name="instantid",
            family="instantid",
            projection="resampler",
            feature=None,
            uncond="zero-embeds",
            inputs="face",
            combine="average",
            identitynet=True,
            description="InstantID (SDXL): raw ArcFace embedding -> 16 tokens (Resampler) + IdentityNet on 5 keypoints.",
            checkpoints=("ip-adapter.bin",),
            aliases=("instant-id", "instantid_sdxl"),
        ),
        Method(
            name="instantcharacter",
            family="instantcharacter",
            projection="cross-layer-cross-scale",
            feature=None,
            uncond="same-tokens",
            base="flux",
            description="InstantCharacter (FLUX.1): SigLIP + DINOv2 features of the reference at 384 and as four "
            "tiles of 768 -> 1024 timestep-conditioned tokens, attended to in every FLUX block.",
            checkpoints=("instantcharacter_ip-adapter.bin",),
            aliases=("instant-character", "instantcharacter_ip-adapter"),
        ),
        Method(
            name="infiniteyou",
            family="infiniteyou",
            projection="resampler",
            feature=None,
            uncond="same-tokens",
            inputs="face",
            normalize_embedding=True,
            identitynet=True,
            base="flux",
            description="InfiniteYou (FLUX.1): L2-normalised ArcFace embedding -> 8 tokens (Resampler) read by "
            "InfuseNet, a FLUX ControlNet on the 5-keypoint image whose residuals enter every FLUX block.",
            checkpoints=("image_proj_model.bin", "InfuseNetModel"),
            aliases=("infinite-you", "infu", "infu_flux", "infu-flux"),
        ),
        Method(
            name="pulid",
            family="pulid",
            projection="idformer",
            feature=None,
            uncond="zero-embeds",
            inputs="face+image",
            description="PuLID v1.1 (SDXL): raw antelopev2 embedding + EVA02-CLIP of the parsed, aligned face -> "
            "32 ID tokens (IDFormer) in an ID cross-attention beside every attn2 (ortho v2, zero tokens).",
            checkpoints=("pulid_v1.1.safetensors",),
            aliases=("pulid_v1.1", "pulid-sdxl", "pulid-v1.1"),
        ),
        Method(
            name="pulid-flux",
            family="pulid-flux",
            projection="idformer",
            feature=None,
            uncond="zero-embeds",
            inputs="face",
            base="flux",
            description="PuLID-FLUX: raw antelopev2 embedding + EVA02-CLIP of the parsed, aligned face -> 32 ID "
            "tokens (IDFormer), cross-attended after every 2nd double and 4th single FLUX block.",
            checkpoints=("pulid_flux_v0.9.0.safetensors", "pulid_flux_v0.9.1.safetensors"),
            aliases=("pulid_flux", "pulidflux", "pulid_flux_v0.9.0", "pulid_flux_v0.9.1"),
        ),
    )
}

#: Width of the ArcFace identity embeddings every official face method reads.
FACE_EMBEDDING_DIM = 512

_ALIASES: dict[str, str] = {alias.lower(): m.name for m in METHODS.values() for alias in (m.name, *m.aliases)}


def get_method(name: str) -> Method:
    """Look a method up by name or alias (official file stems work too), case-insensitively."""
    key = name.lower().removesuffix(".bin").removesuffix(".safetensors")
    if key not in _ALIASES:
        raise IdcraftError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}.")
    return METHODS[_ALIASES[key]]


def projection_kind(image_proj: Mapping[str, object]) -> str:
    """Which projection family an ``image_proj`` state dict was saved from, judged by its key names."""
    keys = set(image_proj)
    if "perceiver_resampler.proj_in.weight" in keys:
        return "faceid-plus"
    if "latents" in keys and "proj_in.weight" in keys:
        return "resampler"
    if {"proj.0.weight", "proj.2.weight", "proj.3.weight"} <= keys:
        return "mlp"
    if {"proj.0.weight", "proj.2.weight", "norm.weight"} <= keys:
        return "faceid-mlp"
    if {"proj.weight", "norm.weight"} <= keys:
        return "linear"
    raise CheckpointError(
        f"image_proj keys {sorted(keys)[:8]} match no known projection (IP-Adapter linear, Full-face MLP, "
        "Perceiver Resampler, FaceID MLP or FaceID-Plus)."
    )


def detect_method(
    image_proj: Mapping[str, object], ip_adapter: Mapping[str, object], filename: str | None = None
) -> Method:
    """The method an official checkpoint was saved from, as far as its keys tell.

    Keys cannot tell Plus from Plus-Face, FaceID-Plus from PlusV2 (same architectures, different training
    or use) nor SD1.5 from its "light" variant. An official file name settles it when it names a method
    (``ip-adapter-faceid-plusv2_sd15.bin``); otherwise the first method of the family is taken, and
    ``method=`` can say otherwise.
    """
    kind = projection_kind(image_proj)
    shape = getattr(image_proj.get("proj_in.weight"), "shape", None)
    # A Resampler reading 512 values reads an ArcFace identity embedding (InstantID), not CLIP features.
    reads_face = kind == "resampler" and shape is not None and shape[1] == FACE_EMBEDDING_DIM
    has_lora = any("_lora." in k for k in ip_adapter)
    candidates = [
        m
        for m in METHODS.values()
        if m.projection == kind
        and m.base == "sd"  # FLUX methods are chosen by their files' layout, not an SD checkpoint's keys
        and (m.lora == has_lora or kind != "faceid-mlp")
        and (kind != "resampler" or m.needs_face == reads_face)
    ]
    if not candidates:
        raise CheckpointError(
            f"no known method has a {kind} projection {'with' if has_lora else 'without'} LoRA."
        )
    if filename:
        stem = filename.rsplit("/", 1)[-1].lower()
        named = [
            m
            for m in candidates
            if any(stem.startswith(a) for a in sorted((m.name, *m.aliases), key=len, reverse=True))
        ]
        if named:
            return max(named, key=lambda m: max(len(a) for a in (m.name, *m.aliases) if stem.startswith(a)))
    return candidates[0]


def pulid_kind(keys) -> str | None:
    """``"pulid-flux"`` (``pulid_encoder.*`` + ``pulid_ca.*``), ``"pulid"`` (SDXL v1.1: ``id_adapter.*`` +
    ``id_adapter_attn_layers.*``) or ``None`` (not a PuLID release), from tensor names alone."""
    tops = {str(k).split(".", 1)[0] for k in keys}
    if "pulid_ca" in tops or "pulid_encoder" in tops:
        return "pulid-flux"
    if "id_adapter_attn_layers" in tops or "id_adapter" in tops:
        return "pulid"
    return None


def safetensors_keys(path) -> list[str] | None:
    """The tensor names in a ``.safetensors`` file's header (no weights read, no torch imported); ``None``
    when ``path`` is not a readable safetensors file."""
    import json
    import struct
    from pathlib import Path

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 1024**2:
                return None
            return [k for k in json.loads(f.read(length)) if k != "__metadata__"]
    except (OSError, ValueError, struct.error):
        return None


def resolve_method(
    requested: str | None,
    image_proj: Mapping[str, object],
    ip_adapter: Mapping[str, object],
    filename: str | None = None,
) -> Method:
    """``requested`` if given and consistent with the checkpoint's keys, else the detected method."""
    detected = detect_method(image_proj, ip_adapter, filename)
    if requested is None:
        return detected
    method = get_method(requested)
    if (method.projection, method.lora, method.needs_face) != (
        detected.projection,
        detected.lora,
        detected.needs_face,
    ):
        raise CheckpointError(
            f"--method {method.name} expects a {method.projection} projection{' with LoRA' if method.lora else ''}, "
            f"but the checkpoint holds a {detected.projection} projection{' with LoRA' if detected.lora else ''} "
            f"(a {detected.name} file). Use --method {detected.name}, or leave --method out to detect it."
        )
    return method
