"""What one generation asks for and what it gives back: plain data, checked before any model loads.

:class:`GenerationRequest` is the one request shape of :class:`idcraft.engine.Engine` -- the command line,
the server, batch jobs and the offline world's evaluation all build one. :meth:`GenerationRequest.validate`
runs the checks that need no model (finite numbers, sizes, seeds, counts) in microseconds, so a mistake
is reported before torch is even imported; checks that depend on the loaded base model (its size factor)
run in the engine. Importing this module imports neither torch nor diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import IdcraftError

#: Request fields only some methods read (each family lists the ones it reads); the rest are common.
METHOD_OPTIONS: dict[str, Any] = {
    "face_embeddings": None,
    "s_scale": 1.0,
    "control_images": (),
    "controlnet_scales": None,
    "keypoints": None,
    "multi_person": False,
    "face_index": 0,
    "true_cfg": 1.0,
    "start_step": 0,
    "aligned_faces": None,
    "face_parsings": None,
    "num_zero": None,
    "ortho": None,
    "sampler": None,
}


def request_flags() -> list[tuple[str, dict[str, Any]]]:
    """``(flag, argparse keyword arguments)`` for every request field a command line exposes, from the
    fields' own help (one source for ``idcraft generate``, ``idcraft batch`` and the server's docs)."""
    out = []
    for f in fields(GenerationRequest):
        meta = f.metadata
        if "help" not in meta:
            continue
        flag = "--" + meta.get("flag", f.name.replace("_", "-"))
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        if meta.get("required"):
            kwargs["required"] = True
        elif "repeat" in meta:
            kwargs.update(action="append", type=meta["repeat"], default=None)
        elif f.type in ("bool",):
            kwargs.update(action="store_true")
        else:
            kind = meta.get("type") or {"int": int, "float": float, "str": str}.get(
                str(f.type).split(" |")[0], str
            )
            kwargs.update(type=kind, default=f.default)
        out.append((flag, kwargs))
    return out


#: Largest seed ``torch.Generator.manual_seed`` takes.
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class Limits:
    """Bounds on one request: a server sets them from its config, the command line uses the defaults.

    ``max_pixels`` bounds width x height of one image (the default allows 2048 x 2048, four times SDXL's
    native size; memory grows with it), ``max_side`` either side, ``max_steps`` the denoising steps and
    ``max_images`` the images of one request."""

    max_pixels: int = 2048 * 2048
    max_side: int = 4096
    max_steps: int = 500
    max_images: int = 16
    max_references: int = 16
    max_prompt_chars: int = 4000


@dataclass
class GenerationRequest:
    """One generation: a prompt, the subject (reference images, saved face embeddings, or conditioning
    already computed by :meth:`idcraft.engine.Engine.encode`), and the settings.

    ``None`` settings take the method's defaults (30 steps, guidance 7.5, scale 1.0 for the SD families;
    28, 3.5 and 0.8 for InstantCharacter). ``seed`` seeds ``torch.Generator("cpu")`` as diffusers and the
    official code do (``None``: a random seed, reported in the result). ``keypoints`` are five ``[x, y]``
    per face in output pixels (InstantID; several people). Options a method does not read are refused
    by the engine rather than ignored.
    """

    prompt: str = field(metadata={"help": "what the image should show", "required": True})
    method: str | None = field(
        default=None, metadata={"help": "adapter method; detected from the checkpoint when left out"}
    )
    references: Sequence[Any] = field(
        default=(),
        metadata={
            "help": "reference image; repeat for several (see the README for how each method combines them)",
            "flag": "reference",
            "metavar": "IMAGE",
            "repeat": str,
        },
    )
    face_embeddings: Sequence[Any] | None = field(
        default=None,
        metadata={
            "help": "raw ArcFace embedding (as `idcraft faces --save-embeddings` writes it); repeatable; skips "
            "face analysis. Each method normalises it as its official code does",
            "flag": "face-embedding",
            "metavar": "FILE.npy",
            "repeat": str,
        },
    )
    conditioning: Any = None  # from Engine.encode: the references already encoded
    negative_prompt: str = field(default="", metadata={"help": "what the image should not show"})
    scale: float | None = field(
        default=None,
        metadata={
            "help": "adapter scale, instantcharacter's subject scale (0 = base model alone). Default: 1.0 "
            "(0.8 for instantcharacter)"
        },
    )
    s_scale: float = field(default=1.0, metadata={"help": "FaceID-PlusV2: weight of the CLIP face structure"})
    seed: int | None = field(
        default=0, metadata={"help": "seeds torch.Generator('cpu'), as diffusers and the official code do"}
    )
    steps: int | None = field(
        default=None, metadata={"help": "denoising steps. Default: 30 (28 for instantcharacter)"}
    )
    guidance: float | None = field(
        default=None,
        metadata={
            "help": "classifier-free guidance scale; for instantcharacter FLUX's guidance embedding. Default: "
            "7.5 (3.5 for instantcharacter)"
        },
    )
    width: int | None = field(
        default=None, metadata={"help": "default: the base model's native size (InstantID: the reference's)"}
    )
    height: int | None = field(default=None, metadata={"help": "default: as --width"})
    num_images: int = field(default=1, metadata={"help": "images to generate from the one seed"})
    control_images: Sequence[Any] = field(
        default=(),
        metadata={
            "help": "condition image of each extra ControlNet, in --controlnet order",
            "flag": "control-image",
            "metavar": "IMAGE",
            "repeat": str,
        },
    )
    controlnet_scales: Sequence[float] | None = field(
        default=None,
        metadata={
            "help": "per ControlNet, in order (1.0 when left out)",
            "flag": "controlnet-scale",
            "metavar": "S",
            "repeat": float,
        },
    )
    keypoints: Any = field(
        default=None,
        metadata={
            "help": "five [x, y] face keypoints per face in output pixels, a JSON file (instantid; several "
            "people). Default: the reference's own, in its frame",
            "metavar": "FILE.json",
            "type": str,
        },
    )
    multi_person: bool = field(
        default=False,
        metadata={
            "help": "each --reference (or each face of a single group photo) is a different person, kept in "
            "its own region of the output; without it several photos are one person"
        },
    )
    face_index: int = field(default=0, metadata={"help": "which face of each photo: 0 = largest"})
    true_cfg: float = field(
        default=1.0,
        metadata={
            "help": "instantcharacter, pulid-flux: true classifier-free guidance scale with --negative-prompt (a "
            "second pass per step; pulid-flux's from step 1, with the unconditional ID tokens); 1 = off, as in "
            "the official pipelines"
        },
    )
    start_step: int = field(
        default=0,
        metadata={
            "help": "pulid-flux: the first denoising step that sees the identity (official advice: 0-1 for "
            "stylised images, up to 4 for photos; later = more editable, less like the face)"
        },
    )
    aligned_faces: Sequence[Any] | None = field(
        default=None,
        metadata={
            "help": "pulid: a 512x512 face already aligned as facexlib does, one per face (skips detection and "
            "alignment; give --face-embedding with it)",
            "flag": "aligned-face",
            "metavar": "IMAGE",
            "repeat": str,
        },
    )
    face_parsings: Sequence[Any] | None = field(
        default=None,
        metadata={
            "help": "pulid: the aligned face's CelebAMask-HQ label map (512x512 one-channel PNG), one per face "
            "(skips BiSeNet)",
            "flag": "face-parsing",
            "metavar": "LABELS.png",
            "repeat": str,
        },
    )
    num_zero: int | None = field(
        default=None, metadata={"help": "pulid: zero tokens appended to the ID tokens. Default: 20"}
    )
    ortho: str | None = field(
        default=None,
        metadata={"help": "pulid: how ID and text attention combine: off, v1 or v2. Default: v2"},
    )
    sampler: str | None = field(
        default=None,
        metadata={
            "help": "pulid: dpmpp_2m (Karras sigmas, for ordinary SDXL bases) or dpmpp_sde (Lightning bases, "
            "guidance ~2). Default: dpmpp_2m"
        },
    )
    progress: bool = False  # show the sampler's progress bar

    def with_defaults(self, defaults: dict[str, Any]) -> GenerationRequest:
        """A copy with every ``None`` setting named in ``defaults`` filled in."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def validate(self, limits: Limits | None = None) -> None:
        """Raise :class:`IdcraftError` for values no model could run: checked before anything loads."""
        limits = limits or Limits()
        if not isinstance(self.prompt, str):
            raise IdcraftError("prompt must be text.")
        if len(self.prompt) > limits.max_prompt_chars:
            raise IdcraftError(
                f"the prompt is {len(self.prompt)} characters; at most {limits.max_prompt_chars} are accepted."
            )
        for name in ("scale", "s_scale", "guidance", "true_cfg"):
            value = getattr(self, name)
            if value is not None and not _finite(value):
                raise IdcraftError(f"{_flag(name)} must be a finite number, got {value!r}.")
        if self.guidance is not None and self.guidance < 0:
            raise IdcraftError(f"--guidance must be 0 or more, got {self.guidance:g}.")
        if self.true_cfg < 1:
            raise IdcraftError(f"--true-cfg must be at least 1 (1 = off), got {self.true_cfg:g}.")
        for scale in self.controlnet_scales or ():
            if not _finite(scale):
                raise IdcraftError(f"--controlnet-scale must be a finite number, got {scale!r}.")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED
        ):
            raise IdcraftError(f"--seed must be a whole number from 0 to 2**64-1, got {self.seed!r}.")
        _count("--steps", self.steps, limits.max_steps)
        if not isinstance(self.start_step, int) or isinstance(self.start_step, bool) or self.start_step < 0:
            raise IdcraftError(f"--start-step must be a whole number, 0 or more, got {self.start_step!r}.")
        _count("--num-images", self.num_images, limits.max_images)
        if not isinstance(self.face_index, int) or self.face_index < 0:
            raise IdcraftError(
                f"--face-index must be 0 or more (0 = the largest face), got {self.face_index!r}."
            )
        if len(self.references) > limits.max_references:
            raise IdcraftError(
                f"{len(self.references)} references given; at most {limits.max_references} are accepted."
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 8:
                raise IdcraftError(f"--{name} must be a whole number of pixels, at least 8, got {value!r}.")
            if value > limits.max_side:
                raise IdcraftError(f"--{name} {value} is over the limit of {limits.max_side} pixels.")
            if value % 8:  # every base: the VAE halves the image three times (FLUX packs 2x2 more)
                raise IdcraftError(
                    f"--{name} {value} is not a multiple of 8, which every base model needs (try {value // 8 * 8})."
                )
        if (
            self.width is not None
            and self.height is not None
            and self.width * self.height > limits.max_pixels
        ):
            raise IdcraftError(
                f"{self.width}x{self.height} is {self.width * self.height / 1e6:.1f} megapixels, over the limit of "
                f"{limits.max_pixels / 1e6:.1f}: the latents, attention and VAE decode grow with it. Generate "
                "smaller and upscale, or raise the limit."
            )
        if self.keypoints is not None:
            _check_keypoints(self.keypoints)
        if self.num_zero is not None and (not isinstance(self.num_zero, int) or self.num_zero < 0):
            raise IdcraftError(f"--num-zero must be a whole number, 0 or more, got {self.num_zero!r}.")
        if self.ortho is not None and self.ortho not in ("off", "v1", "v2"):
            raise IdcraftError(f"--ortho must be off, v1 or v2, got {self.ortho!r}.")
        if self.sampler is not None and self.sampler not in ("dpmpp_2m", "dpmpp_sde"):
            raise IdcraftError(f"--sampler must be dpmpp_2m or dpmpp_sde, got {self.sampler!r}.")


@dataclass
class GenerationResult:
    """The images of one request and what was used to make them: the method, the seed (the random one
    drawn when the request had none), every setting after defaults, seconds per stage, and warnings
    (a prompt cut at the text encoder's length, say)."""

    images: list
    method: str
    seed: int | None
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


#: Device names idcraft runs on (``auto`` picks CUDA, then MPS, then the CPU).
DEVICE_KINDS = ("auto", "cpu", "cuda", "mps", "xpu")


def check_device(device: str | None) -> None:
    """Refuse a device name no backend has (``tpu``, ``gpu``...) in microseconds, before torch loads;
    whether the device exists on this machine is checked when models load."""
    if device is None:
        return
    kind, _, index = str(device).partition(":")
    if kind not in DEVICE_KINDS or (index and (not index.isdigit() or kind in ("auto", "cpu"))):
        raise IdcraftError(
            f"--device {device!r}: not a device idcraft runs on; use auto, cpu, cuda, cuda:N, mps or xpu."
        )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _count(flag: str, value: Any, limit: int) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise IdcraftError(f"{flag} must be a whole number, at least 1, got {value!r}.")
    if value > limit:
        raise IdcraftError(f"{flag} {value} is over the limit of {limit}.")


def _check_keypoints(keypoints: Any) -> None:
    """Five finite ``[x, y]`` per face, as nested lists or an array."""
    flat = _flatten(keypoints)
    if not flat or len(flat) % 10:
        raise IdcraftError(
            "keypoints must be five [x, y] pairs per face (eyes, nose, mouth corners), in output pixels."
        )
    if not all(_finite(float(v)) if _is_number(v) else False for v in flat):
        raise IdcraftError("keypoints must be finite numbers (a NaN or infinite value was given).")


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _flatten(value: Any) -> list:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _flatten(item)]
    return [value]
