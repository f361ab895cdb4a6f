"""What the server keeps loaded: each served method's engine, device and request defaults.

With no ``models`` in the config it serves the offline world (:func:`idcraft.world.generate.world_engine`:
every bundled method on one shared miniature SD1.5, no download). Otherwise each entry is loaded from its
files; SD-family entries naming the same base, device and dtype share one loaded base model (and one
image encoder per encoder folder), each with its own adapter attached, as the world does. Methods are
grouped into engines by their face settings (an engine has one face backend).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine
from ..errors import IdcraftError
from ..methods import family_of
from ..registry import get_method
from .config import ModelConfig, ServeConfig

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
    from collections import Counter, defaultdict

    entries = []
    for entry in config.models:
        method = get_method(entry.method)
        entries.append((method.name, entry))
    names = Counter(name for name, _ in entries)
    repeated = [n for n, c in names.items() if c > 1]
    if repeated:
        raise IdcraftError(f"models: {', '.join(repeated)} given more than once (one entry per method).")
    share = Counter(_base_key(e) for _, e in entries if _can_share(e))
    loaded = _Loaded()
    pipelines: dict[str, Any] = {}
    devices: dict[str, str] = {}
    for name, entry in entries:
        log.info("loading %s from %s", name, entry.adapter)
        if _can_share(entry) and share[_base_key(entry)] > 1:
            pipelines[name] = loaded.shared_pipeline(name, entry)
        else:
            pipelines[name] = Engine.from_pretrained(
                entry.base,
                entry.adapter,
                entry.image_encoder,
                method=name,
                image_encoder_2=entry.image_encoder_2,
                controlnet=entry.controlnet,
                device=entry.device,
                dtype=entry.dtype,
                offload=entry.offload,
                width=entry.width,
                height=entry.height,
            ).pipeline(name)
        devices[name] = _device_name(entry.device)
    groups: dict[tuple, dict[str, Any]] = defaultdict(dict)
    for name, entry in entries:
        backend = entry.face_backend or config.face_backend
        models = entry.face_models if entry.face_backend else (entry.face_models or config.face_models)
        groups[(backend, models)][name] = pipelines[name]
    engines = {}
    for (backend, models), group in groups.items():
        engine = Engine(group, face_backend=backend, face_models=models, limits=config.limits)
        for name in group:
            engines[name] = engine
    served = [Served(name, engines[name], devices[name], dict(entry.defaults)) for name, entry in entries]
    return Catalog(served)


def _can_share(entry: ModelConfig) -> bool:
    return get_method(entry.method).base == "sd" and entry.offload in (None, "none")


def _base_key(entry: ModelConfig) -> tuple:
    return (entry.base, _device_name(entry.device), str(entry.dtype or "auto"))


def _device_name(device: str | None) -> str:
    from ..models import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        return "cuda:0"
    return str(dev)


class _Loaded:
    """Bases and image encoders loaded once, shared by the entries that name them."""

    def __init__(self):
        self.bases: dict[tuple, Any] = {}
        self.encoders: dict[tuple, Any] = {}

    def shared_pipeline(self, name: str, entry: ModelConfig):
        from ..adapter import IPAdapter
        from ..encoders import ClipImageEncoder
        from ..models import (
            load_base_pipeline,
            load_controlnet,
            load_image_encoder,
            resolve_device,
            resolve_dtype,
        )
        from ..pipeline import IPAdapterPipeline

        dev = resolve_device(entry.device)
        dt = resolve_dtype(entry.dtype, dev)
        adapter = IPAdapter.from_checkpoint(str(entry.adapter), method=name)
        encoder = None
        if adapter.method.needs_image_encoder:
            if entry.image_encoder is None:
                raise IdcraftError(
                    f"models.{entry.method}: {name} reads CLIP image features: give image_encoder."
                )
            key = (entry.image_encoder, str(dev), str(dt))
            if key not in self.encoders:
                self.encoders[key] = ClipImageEncoder(
                    load_image_encoder(entry.image_encoder, device=dev, dtype=dt)
                )
            encoder = self.encoders[key]
        key = _base_key(entry)
        if key not in self.bases:
            base = load_base_pipeline(entry.base, device=dev, dtype=dt)
            base.set_progress_bar_config(disable=True)
            self.bases[key] = base
        controlnets = (
            entry.controlnet
            if isinstance(entry.controlnet, list)
            else [entry.controlnet]
            if entry.controlnet
            else []
        )
        loaded = [load_controlnet(c, device=dev, dtype=dt) for c in controlnets]
        return IPAdapterPipeline(self.bases[key], adapter, encoder, controlnet=loaded or None)


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
