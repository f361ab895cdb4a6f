"""What one generation asks for and what it gives back: plain data, checked before any model loads.

:class:`GenerationRequest` is the one request shape of :class:`idcraft.engine.Engine` -- the command line,
the server, batch jobs and the offline world's evaluation all build one. :meth:`GenerationRequest.validate`
runs the checks that need no model (finite numbers, sizes, seeds, counts) in microseconds, so a mistake
is reported before torch is even imported; checks that depend on the loaded base model (its size factor)
run in the engine. Importing this module imports neither torch nor diffusers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence
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
    "face_index": None,
    "true_cfg": 1.0,
    "infusenet_start": 0.0,
    "infusenet_end": 1.0,
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
        for alias in meta.get("aliases", ()):  # another name for the same setting (same dest)
            out.append(("--" + alias, {**kwargs, "help": f"same as {flag}", "default": argparse.SUPPRESS}))
    return out


#: Largest seed ``torch.Generator.manual_seed`` takes.
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class Limits:
    """Bounds on one request: a server sets them from its config, the command line uses the defaults.

    ``max_pixels`` bounds width x height of one image (the default allows 2048 x 2048, four times SDXL's
    native size; memory grows with it), ``max_side`` either side, ``max_steps`` the denoising steps and
    ``max_images`` the images of one request.

    Each bound alone still lets a request combine them into hours of work (16 images x 2048^2 x 500
    steps), so ``max_pixel_steps`` bounds their product, width x height x steps x images: the work of the
    denoising loop, which is what a request's time grows with. The default, 1024^2 x 50 steps x 4 images,
    lets every normal request through (SDXL or FLUX at 1024^2 with 50 steps and 4 images; anything at 512^2
    up to 16 images x 50 steps) and refuses 16 images at 1024^2 x 50 steps."""

    max_pixels: int = 2048 * 2048
    max_side: int = 4096
    max_steps: int = 500
    max_images: int = 16
    max_references: int = 16
    max_prompt_chars: int = 4000
    max_pixel_steps: int = 1024 * 1024 * 50 * 4

    def check_cost(self, width: int, height: int, steps: int, images: int) -> None:
        """Refuse a request whose denoising work (width x height x steps x images) is over
        ``max_pixel_steps``, saying what it costs and what would fit."""
        cost = width * height * steps * images
        if cost <= self.max_pixel_steps:
            return
        fit_images = self.max_pixel_steps // (width * height * steps)
        fit_steps = self.max_pixel_steps // (width * height * images)
        hint = [f"at most {fit_images} image(s) at this size and step count"] if fit_images else []
        if fit_steps:
            hint.append(f"at most {fit_steps} steps for {images} image(s)")
        hint.append("a smaller size")
        raise IdcraftError(
            f"this request is {images} image(s) x {width}x{height} x {steps} steps = {cost / 1e6:,.0f} million "
            f"pixel-steps, over the limit of {self.max_pixel_steps / 1e6:,.0f} million (limits.max_pixel_steps): "
            f"it would run for a very long time. Lower it: {', or '.join(hint)}."
        )


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
            "help": "reference image; repeat for several (docs/ip-adapter.md and docs/faces.md: how each method combines them)",
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
            "help": "adapter scale, instantcharacter's subject scale, infiniteyou's InfuseNet scale (0 = base "
            "model alone). Default: 1.0 (0.8 for instantcharacter)",
            "aliases": ("infusenet-scale",),
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
    face_index: int | None = field(
        default=None,
        metadata={
            "help": "which face of each reference photo, largest first: 0 = the largest, 1 = the next... "
            "Left out, a photo with several faces is refused (say which, or crop it)"
        },
    )
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
    infusenet_start: float = field(
        default=0.0, metadata={"help": "infiniteyou: fraction of the steps before InfuseNet starts acting"}
    )
    infusenet_end: float = field(
        default=1.0, metadata={"help": "infiniteyou: fraction of the steps after which InfuseNet stops"}
    )
    progress: bool = False  # show the sampler's progress bar

    def __post_init__(self) -> None:
        # The library's door: a wrong type is refused here, naming the field, rather than failing deep
        # inside a model as a TypeError. One path or one image is one reference (a string is not a
        # sequence of references, letter by letter).
        self.references = _images("references", self.references)
        self.control_images = _images("control_images", self.control_images)
        if self.face_embeddings is not None:
            self.face_embeddings = _embeddings(self.face_embeddings)
        if self.controlnet_scales is not None:
            self.controlnet_scales = _numbers("controlnet_scales", self.controlnet_scales)
        check_types(self)

    def with_defaults(self, defaults: dict[str, Any]) -> GenerationRequest:
        """A copy with every ``None`` setting named in ``defaults`` filled in."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def validate(self, limits: Limits | None = None) -> None:
        """Raise :class:`IdcraftError` for values no model could run: checked before anything loads."""
        limits = limits or Limits()
        check_types(self)  # again: fields may have been set after construction
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
        for name in ("infusenet_start", "infusenet_end"):
            value = getattr(self, name)
            if not _finite(value) or not 0 <= value <= 1:
                raise IdcraftError(
                    f"{_flag(name)} must be a fraction of the steps from 0 to 1, got {value!r}."
                )
        if self.infusenet_start > self.infusenet_end:
            raise IdcraftError(
                f"--infusenet-start {self.infusenet_start:g} is after --infusenet-end {self.infusenet_end:g}."
            )
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
        if self.face_index is not None and (not isinstance(self.face_index, int) or self.face_index < 0):
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
            if self.width is not None and self.height is not None:
                check_keypoints_inside(self.keypoints, (self.width, self.height), "the output")
        if self.width is not None and self.height is not None and self.steps is not None:
            limits.check_cost(self.width, self.height, self.steps, self.num_images)
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
    if isinstance(keypoints, (str, os.PathLike)):
        raise IdcraftError(
            f"keypoints {str(keypoints)!r} is a file name: read it first (idcraft.inputs.load_keypoints) and "
            "pass the five [x, y] pairs per face."
        )
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


# ---------------------------------------------------------------------------- types at the door
#: Each field's accepted types, as a check and the words of the message (``None`` allowed where listed).
_NUMBER = "a number"
_WHOLE = "a whole number"
_TEXT = "text (str)"
_FIELD_TYPES: dict[str, tuple[str, bool]] = {
    "prompt": (_TEXT, False),
    "method": (_TEXT, True),
    "negative_prompt": (_TEXT, False),
    "scale": (_NUMBER, True),
    "s_scale": (_NUMBER, False),
    "guidance": (_NUMBER, True),
    "true_cfg": (_NUMBER, False),
    "seed": (_WHOLE, True),
    "steps": (_WHOLE, True),
    "width": (_WHOLE, True),
    "height": (_WHOLE, True),
    "num_images": (_WHOLE, False),
    "face_index": (_WHOLE, True),
    "multi_person": ("True or False", False),
    "progress": ("True or False", False),
}


def check_types(request: Any) -> None:
    """Refuse a field of the wrong type with an :class:`IdcraftError` naming the field, the type expected
    and the value given (whether the value is in range is :meth:`GenerationRequest.validate`'s job)."""
    if not isinstance(request, GenerationRequest):
        raise not_a_request(request)
    for name, (expected, optional) in _FIELD_TYPES.items():
        value = getattr(request, name)
        if value is None and optional:
            continue
        if not _is_type(value, expected):
            raise _wrong_type(name, value, expected + (" or None" if optional else ""))
    keypoints = request.keypoints
    if (
        keypoints is not None
        and not isinstance(keypoints, (str, os.PathLike))
        and not _numeric_nest(keypoints)
    ):
        raise _wrong_type(
            "keypoints", request.keypoints, "five [x, y] numbers per face (nested lists or an array)"
        )


def not_a_request(value: Any) -> IdcraftError:
    """The error for something given where a :class:`GenerationRequest` belongs (a dict, say)."""
    if isinstance(value, Mapping):
        return IdcraftError(
            "expected a GenerationRequest, got a dict: build one with GenerationRequest(**fields) "
            "(idcraft.requests), so that every field is checked."
        )
    return IdcraftError(f"expected a GenerationRequest, got {_describe(value)}.")


def _is_type(value: Any, expected: str) -> bool:
    if expected == _TEXT:
        return isinstance(value, str)
    if expected == "True or False":
        return isinstance(value, bool) or _is_numpy_scalar(value, "b")
    if isinstance(value, bool):
        return False
    if expected == _WHOLE:
        return isinstance(value, int) or _is_numpy_scalar(value, "iu")
    return isinstance(value, (int, float)) or _is_numpy_scalar(value, "iuf")


def _is_numpy_scalar(value: Any, kinds: str) -> bool:
    np = sys.modules.get("numpy")  # not imported: the value cannot be a NumPy scalar
    return np is not None and isinstance(value, np.generic) and value.dtype.kind in kinds


def _wrong_type(name: str, value: Any, expected: str) -> IdcraftError:
    return IdcraftError(f"GenerationRequest.{name} must be {expected}, got {_describe(value)}.")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _is_image(value: Any) -> bool:
    """A PIL image or an image array, found without importing PIL or NumPy (not imported: not one)."""
    pil = sys.modules.get("PIL.Image")
    np = sys.modules.get("numpy")
    return (pil is not None and isinstance(value, pil.Image)) or (
        np is not None and isinstance(value, np.ndarray)
    )


def _is_one_image(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike, bytes, bytearray)) or _is_image(value)


def _images(name: str, value: Any) -> tuple:
    """``references`` / ``control_images`` as a tuple: one path, encoded file (bytes) or image is one;
    a list or tuple is several; anything else is refused."""
    expected = "an image path, PIL image, image array or encoded image bytes, or a list of them"
    if value is None:
        return ()
    if _is_one_image(value):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise _wrong_type(name, value, expected)
    for i, item in enumerate(value):
        if not _is_one_image(item):
            raise _wrong_type(f"{name}[{i}]", item, "an image path, PIL image, image array or image bytes")
    return tuple(value)


def _embeddings(value: Any) -> tuple:
    """``face_embeddings`` as a tuple of vectors or paths: one 1-d array, one path or a list of them."""
    expected = "a face embedding (a 1-d array of numbers or a .npy path), or a list of them"
    np = sys.modules.get("numpy")
    torch = sys.modules.get("torch")
    arrays = tuple(m.ndarray if m is np else m.Tensor for m in (np, torch) if m is not None)
    if isinstance(value, (str, os.PathLike)):
        return (value,)
    if arrays and isinstance(value, arrays):
        return (value,) if value.ndim == 1 else tuple(value)
    if isinstance(value, (list, tuple)):
        if value and all(_is_type(v, _NUMBER) for v in value):
            return (value,)  # one vector given as a list of numbers
        for i, item in enumerate(value):
            ok = isinstance(item, (str, os.PathLike)) or (arrays and isinstance(item, arrays))
            ok = ok or (isinstance(item, (list, tuple)) and all(_is_type(v, _NUMBER) for v in item))
            if not ok:
                raise _wrong_type(f"face_embeddings[{i}]", item, "a 1-d array of numbers or a .npy path")
        return tuple(value)
    raise _wrong_type("face_embeddings", value, expected)


def _numbers(name: str, value: Any) -> tuple:
    if _is_type(value, _NUMBER):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(_is_type(v, _NUMBER) for v in value):
        raise _wrong_type(name, value, "a number or a list of numbers")
    return tuple(value)


def _numeric_nest(value: Any) -> bool:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return all(_numeric_nest(v) for v in value)
    return _is_type(value, _NUMBER)


def check_keypoints_inside(keypoints: Any, size: tuple[int, int], frame: str) -> None:
    """Refuse keypoints outside ``size`` (width, height) of ``frame``: the face would be drawn off the
    image, so IdentityNet sees no face and the identity is lost without a word."""
    flat = [float(v) for v in _flatten(keypoints)]
    width, height = size
    for face, start in enumerate(range(0, len(flat), 10)):
        for x, y in zip(flat[start : start + 10 : 2], flat[start + 1 : start + 10 : 2], strict=True):
            if not (0 <= x <= width and 0 <= y <= height):
                raise IdcraftError(
                    f"keypoint [{x:g}, {y:g}] of face {face} is outside {frame} ({width}x{height}): keypoints "
                    f"are in its pixels, x from 0 to {width} and y from 0 to {height}. Check the file, or "
                    "give --width/--height for the frame the keypoints were measured in."
                )
