"""What the server keeps loaded: each served method's engine, device and request defaults.

With no ``models`` in the config it serves the offline world (:func:`idcraft.world.generate.world_engine`:
every bundled method on one shared miniature SD1.5, no download). Otherwise each entry is loaded from its
files by :func:`idcraft.model_config.load_engines`: SD-family entries naming the same base, device and
dtype share one loaded base model (and one image encoder per encoder folder), each with its own adapter
attached, as the world does; methods are grouped into engines by their face settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine
from ..errors import IdcraftError
from ..methods import family_of
from ..model_config import device_name, load_engines
from ..registry import get_method
from .config import ServeConfig

log = logging.getLogger("idcraft.serve")


@dataclass
class Served:
    """One method the server answers for."""

    method: str
    engine: Engine
    device: str
    #: server-side defaults for settings a request leaves out (before the family's own)
    defaults: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says about it."""
        method = get_method(self.method)
        family = family_of(method)
        defaults = {**family.defaults, **self.defaults}
        width, height = native_size(self.engine.pipeline(self.method))
        defaults.setdefault("width", width)
        defaults.setdefault("height", height)
        return {
            "id": self.method,
            "object": "model",
            "owned_by": "idcraft",
            "family": method.family,
            "device": self.device,
            "needs_face": bool(getattr(method, "needs_face", False)),
            "defaults": defaults,
            "options": sorted(_api_option(o) for o in family.allowed(method) if _api_option(o)),
        }


#: Request options exposed by the HTTP API (control images and saved embeddings are not).
API_OPTIONS = {
    "s_scale": "s_scale",
    "keypoints": "keypoints",
    "multi_person": "multi_person",
    "face_index": "face_index",
    "true_cfg": "true_cfg",
    "start_step": "start_step",
    "num_zero": "num_zero",
    "ortho": "ortho",
    "sampler": "sampler",
}


def _api_option(name: str) -> str | None:
    return API_OPTIONS.get(name)


class Catalog:
    """Served methods by name, in the config's order (the first is the default)."""

    def __init__(self, served: list[Served], *, world: bool = False, world_root: Any = None):
        if not served:
            raise IdcraftError("nothing to serve: the config loads no method.")
        self._served = {s.method: s for s in served}
        self.world = world
        self.world_root = world_root

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self._served)

    @property
    def default(self) -> str:
        return next(iter(self._served))

    @property
    def devices(self) -> list[str]:
        return sorted({s.device for s in self._served.values()})

    def get(self, name: str | None) -> Served:
        """The served method ``name`` (an alias works), or the default one."""
        if name is None:
            return self._served[self.default]
        try:
            method = get_method(name).name
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
    return Catalog(served, world=True, world_root=config.world.bundle)


def models_catalog(config: ServeConfig) -> Catalog:
    log.info("loading %s", ", ".join(f"{e.method} from {e.adapter}" for e in config.models.values()))
    engines = load_engines(config)
    served = [
        Served(entry.method, engines[label], device_name(entry.device), dict(entry.defaults))
        for label, entry in config.models.items()
    ]
    return Catalog(served)


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
