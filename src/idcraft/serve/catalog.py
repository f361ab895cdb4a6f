"""What the server keeps loaded: each served method's engine, device and request defaults.

With no ``models`` in the config it serves the offline world (:func:`idcraft.world.generate.world_engine`:
every bundled method on one shared miniature SD1.5, no download). Otherwise each entry is loaded from its
files by :func:`idcraft.model_config.load_engines`: SD-family entries naming the same base, device and
dtype share one loaded base model (and one image encoder per encoder folder), each with its own adapter
attached, as the world does; methods are grouped into engines by their face settings.

Where an SD base is loaded, method ``none`` (text-only: no reference, the base model alone) is served too,
after the adapter methods. Sizes a request may ask for are bounded by the base model's native size
(:data:`SIZE_RANGE`), so a 64 px model is not asked for 1024x1024. The world adds its vocabulary and a
prompt check (:mod:`idcraft.world.vocabulary`), which the service calls through the catalog.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine
from ..errors import IdcraftError
from ..methods import family_of
from ..methods.text_only import TEXT_ONLY, is_text_only
from ..model_config import device_name, load_engines
from ..registry import get_method
from .config import ServeConfig

log = logging.getLogger("idcraft.serve")

#: A request's width and height may each be from this fraction to this multiple of the base model's
#: native side: diffusion models draw well near the size they were trained at; far above it they repeat
#: subjects and the time grows with the square of the side (1024x1024 on the 64 px world model: minutes
#: for noise). SD1.5 (512): 256 to 1024; SDXL (1024): 512 to 2048; the world (64): 32 to 128.
SIZE_RANGE = (0.5, 2.0)
#: When the server started: the ``created`` time of its models (OpenAI's model object has one).
STARTED = int(time.time())


def lookup_method(name: str):
    """The :class:`~idcraft.registry.Method` named ``name``: an adapter method, or ``none`` (text-only)."""
    return TEXT_ONLY if is_text_only(name) else get_method(name)


@dataclass
class Served:
    """One method the server answers for."""

    method: str
    engine: Engine
    device: str
    #: server-side defaults for settings a request leaves out (before the family's own)
    defaults: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says about it: OpenAI's model object plus idcraft's details."""
        method = lookup_method(self.method)
        family = family_of(method)
        defaults = {**family.defaults, **self.defaults}
        if method is TEXT_ONLY:
            defaults.pop("scale", None)
        width, height = self.native_size()
        defaults.setdefault("width", width)
        defaults.setdefault("height", height)
        return {
            "id": self.method,
            "object": "model",
            "created": STARTED,
            "owned_by": "idcraft",
            "description": method.description,
            "family": method.family,
            "device": self.device,
            "needs_reference": method is not TEXT_ONLY,
            "needs_face": bool(getattr(method, "needs_face", False)),
            "defaults": defaults,
            "options": sorted(
                [_api_option(o) for o in family.allowed(method) if _api_option(o)]
                + (["identitynet_scale"] if method.identitynet else [])
            ),
            "sizes": self.sizes(),
        }

    def native_size(self) -> tuple[int | None, int | None]:
        return native_size(self.engine.pipeline(self.method))

    def size_bounds(self) -> tuple[int, int, int] | None:
        """``(smallest side, largest side, multiple)`` a request may ask for (``None``: not known)."""
        width, height = self.native_size()
        if width is None or height is None:
            return None
        factor = self.engine.size_multiple(self.method)
        low = max(factor, int(min(width, height) * SIZE_RANGE[0]) // factor * factor)
        return low, int(max(width, height) * SIZE_RANGE[1]), factor

    def sizes(self) -> dict[str, Any]:
        """The native size and the range of sizes accepted (``GET /v1/models``)."""
        width, height = self.native_size()
        bounds = self.size_bounds()
        if bounds is None:
            return {"native": None}
        low, high, factor = bounds
        return {
            "native": f"{width}x{height}",
            "min": f"{low}x{low}",
            "max": f"{high}x{high}",
            "multiple_of": factor,
        }

    def check_size(self, width: int | None, height: int | None) -> None:
        """Refuse a size this model cannot draw well, saying what it can (400)."""
        bounds = self.size_bounds()
        if bounds is None or (width is None and height is None):
            return
        low, high, factor = bounds
        asked = [v for v in (width, height) if v is not None]
        if all(low <= v <= high for v in asked):
            return
        native_w, native_h = self.native_size()
        raise IdcraftError(
            f"size {width}x{height} is outside what this model ({self.method}) can draw: its base model's native "
            f"size is {native_w}x{native_h}, and each side may be {low} to {high} pixels (a multiple of "
            f"{factor}). Send size={native_w}x{native_h} or leave size out."
        )


#: Request options exposed by the HTTP API (control images are not).
API_OPTIONS = {
    "s_scale": "s_scale",
    "keypoints": "keypoints",
    "multi_person": "multi_person",
    "face_index": "face_index",
    "true_cfg": "true_cfg",
    "infusenet_start": "infusenet_start",
    "infusenet_end": "infusenet_end",
    "start_step": "start_step",
    "num_zero": "num_zero",
    "ortho": "ortho",
    "sampler": "sampler",
    "face_embeddings": "face_embeddings",
    "aligned_faces": "aligned_faces",
    "face_parsings": "face_parsings",
}


def _api_option(name: str) -> str | None:
    return API_OPTIONS.get(name)


class Catalog:
    """Served methods by name, in the config's order (the first is the default)."""

    def __init__(
        self,
        served: list[Served],
        *,
        world: bool = False,
        world_root: Any = None,
        vocabulary: dict[str, Any] | None = None,
        prompt_check: Callable[[str], list[str]] | None = None,
    ):
        if not served:
            raise IdcraftError("nothing to serve: the config loads no method.")
        self._served = {s.method: s for s in served}
        text_only = next((s for s in served if _draws_text_only(s.engine)), None)
        if text_only is not None and TEXT_ONLY.name not in self._served:
            defaults = {k: v for k, v in text_only.defaults.items() if k != "scale"}
            self._served[TEXT_ONLY.name] = Served(
                TEXT_ONLY.name, text_only.engine, text_only.device, defaults
            )
        self.world = world
        self.world_root = world_root
        #: what the served model can draw, in words (the world's); shown by /v1/models and /v1/examples
        self.vocabulary = vocabulary
        #: warnings for a prompt the served model cannot draw as asked (the world's check)
        self.prompt_check = prompt_check

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self._served)

    @property
    def default(self) -> str:
        """The first adapter method (``none`` only when nothing else is served)."""
        return next((m for m in self._served if m != TEXT_ONLY.name), TEXT_ONLY.name)

    @property
    def text_only(self) -> bool:
        return TEXT_ONLY.name in self._served

    @property
    def devices(self) -> list[str]:
        return sorted({s.device for s in self._served.values()})

    def get(self, name: str | None) -> Served:
        """The served method ``name`` (an alias works), or the default one."""
        if name is None:
            return self._served[self.default]
        try:
            method = lookup_method(name).name
        except IdcraftError:
            raise IdcraftError(
                f"unknown method {name!r}; this server serves {', '.join(self.methods)}."
            ) from None
        if method not in self._served:
            raise IdcraftError(
                f"method {method!r} is not served here; this server serves {', '.join(self.methods)}."
            )
        return self._served[method]

    def __iter__(self):
        return iter(self._served.values())


def build_catalog(config: ServeConfig) -> Catalog:
    """Load every model the config names (or the offline world)."""
    if config.uses_world:
        return world_catalog(config)
    return models_catalog(config)


def world_catalog(config: ServeConfig, engine: Engine | None = None) -> Catalog:
    """The offline world's methods, with the world's sampling defaults (``engine``: one already built)."""
    from ..world.generate import DEFAULT_GUIDANCE, DEFAULT_STEPS, world_engine

    if engine is None:
        engine = world_engine(config.world.bundle, device=config.world.device)
    engine.limits = config.limits
    defaults = {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, **config.world.defaults}
    served = [Served(m, engine, _device_of(engine.pipeline(m)), dict(defaults)) for m in engine.methods]
    from ..world.vocabulary import check_prompt, vocabulary

    return Catalog(
        served,
        world=True,
        world_root=config.world.bundle,
        vocabulary=vocabulary(),
        prompt_check=check_prompt,
    )


def models_catalog(config: ServeConfig) -> Catalog:
    log.info("loading %s", ", ".join(f"{e.method} from {e.adapter}" for e in config.models.values()))
    engines = load_engines(config)
    served = [
        Served(entry.method, engines[label], device_name(entry.device), dict(entry.defaults))
        for label, entry in config.models.items()
    ]
    return Catalog(served)


def _draws_text_only(engine: Engine) -> bool:
    """Whether ``engine`` can run method ``none`` (an SD base whose weights are the base model's own)."""
    if not engine.text_only:
        return False
    try:
        engine.pipeline(TEXT_ONLY.name)
    except IdcraftError:  # e.g. FaceID alone on its base, its LoRA merged into the weights
        return False
    return True


def _device_of(pipe) -> str:
    device = getattr(pipe, "device", None)
    return str(device) if device is not None else "cpu"


def native_size(pipe) -> tuple[int | None, int | None]:
    """The base model's native output size, where it can be read from its config."""
    inner = getattr(pipe, "pipe", pipe)
    unet = getattr(inner, "unet", None)
    factor = getattr(inner, "vae_scale_factor", None)
    sample = getattr(getattr(unet, "config", None), "sample_size", None)
    if isinstance(sample, int) and isinstance(factor, int):
        return sample * factor, sample * factor
    return None, None
