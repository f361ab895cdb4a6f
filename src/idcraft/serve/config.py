"""``idcraft serve``'s configuration: which models stay loaded, and the server's limits.

A YAML file (``idcraft serve --config serve.yaml``) with three optional sections::

    models:                       # left out: the offline world bundled with idcraft
      ip-adapter-plus:            # a method name (or alias); one entry per served method
        base: ./stable-diffusion-v1-5
        adapter: ./IP-Adapter/models/ip-adapter-plus_sd15.safetensors
        image_encoder: ./IP-Adapter/models/image_encoder
        device: cuda:0            # auto | cpu | cuda | cuda:N | mps
        dtype: float16            # auto | float16 | bfloat16 | float32
        defaults: {steps: 30, guidance: 7.5, scale: 0.7}
    world: {bundle: null, device: auto}   # the offline world (used when there is no models section)
    server:
      queue_length: 16
      concurrency_per_device: 1
      ...
    limits: {max_pixels: 1048576, max_steps: 100}    # idcraft.requests.Limits fields

Unknown keys are refused with the key's name, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IdcraftError
from ..requests import Limits

#: Request settings a served method may default (``None`` in a request takes these, then the family's).
DEFAULTABLE = ("steps", "guidance", "scale", "width", "height", "negative_prompt")


@dataclass
class ModelConfig:
    """One served method: the files it loads and where it runs."""

    method: str
    base: str
    adapter: str
    image_encoder: str | None = None
    image_encoder_2: str | None = None
    controlnet: str | list[str] | None = None
    device: str = "auto"
    dtype: str | None = None
    offload: str | None = None
    width: int | None = None
    height: int | None = None
    face_backend: str | None = None
    face_models: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorldConfig:
    """The offline world: the bundle folder (default: the packaged one) and device."""

    bundle: str | None = None
    device: str = "auto"
    defaults: dict[str, Any] = field(default_factory=dict)
    #: How many held-out reference portraits ``GET /v1/examples`` offers.
    examples: int = 4


@dataclass
class ServerConfig:
    """Load bounds and access (see the README's Serve section)."""

    #: Requests waiting for a device beyond the ones running; a full queue answers 429.
    queue_length: int = 16
    #: Generations running at once on one device.
    concurrency_per_device: int = 1
    #: Seconds from arrival to answer (queue wait included); past it the answer is 504.
    request_timeout_s: float = 300.0
    #: Largest request body; more is refused with 413 before it is parsed.
    max_body_bytes: int = 16 * 1024 * 1024
    #: Largest reference image (width x height), checked from the header before decoding: 413.
    max_image_pixels: int = 4096 * 4096
    #: Identity cache bounds: entries and bytes of cached conditioning (tensors).
    cache_entries: int = 256
    cache_bytes: int = 512 * 1024 * 1024
    #: Uploaded references kept (``POST /v1/references``): entries and bytes.
    reference_entries: int = 1024
    reference_bytes: int = 256 * 1024 * 1024
    #: Environment variable holding the bearer token; when it is set and not empty, /v1 and /metrics
    #: require ``Authorization: Bearer <token>``.
    auth_token_env: str = "IDCRAFT_API_TOKEN"
    #: Origins allowed by CORS; empty = no CORS headers (same-origin only).
    cors_origins: list[str] = field(default_factory=list)
    #: Seconds a shutdown waits for requests in flight before closing them.
    shutdown_grace_s: float = 330.0
    #: Reference images offered by ``GET /v1/examples`` (paths), besides the world's.
    examples: list[str] = field(default_factory=list)


@dataclass
class ServeConfig:
    models: list[ModelConfig] = field(default_factory=list)
    world: WorldConfig = field(default_factory=WorldConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: Limits = field(default_factory=Limits)
    #: Face analysis for every model that names none: ``insightface`` packs, ``default`` or ``world``.
    face_backend: str = "insightface"
    face_models: str | None = None

    @property
    def uses_world(self) -> bool:
        return not self.models


def load_config(path: str | os.PathLike | None = None) -> ServeConfig:
    """The configuration in the YAML file at ``path`` (``None``: every default, serving the world)."""
    if path is None:
        return ServeConfig()
    import yaml

    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise IdcraftError(f"--config {path}: cannot read it ({exc.strerror or exc}).") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise IdcraftError(f"--config {path}: not valid YAML ({exc}).") from exc
    return config_from_dict(data, where=str(path), relative_to=file.parent)


def config_from_dict(data: dict, *, where: str = "config", relative_to: Path | None = None) -> ServeConfig:
    """A :class:`ServeConfig` from parsed YAML/JSON, every key checked. Relative model paths are taken
    from ``relative_to`` (the config file's folder) when such a file or folder exists there."""
    if not isinstance(data, dict):
        raise IdcraftError(f"{where}: expected a mapping at the top level.")
    _known(data, {"models", "world", "server", "limits", "face_backend", "face_models"}, where)
    config = ServeConfig(
        face_backend=str(data.get("face_backend", "insightface")),
        face_models=_path(data.get("face_models"), relative_to),
    )
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise IdcraftError(f"{where}: models must map method names to their files.")
    for name, entry in models.items():
        config.models.append(_model(str(name), entry, f"{where}: models.{name}", relative_to))
    config.world = _section(WorldConfig, data.get("world"), f"{where}: world")
    if config.world.bundle is not None:
        config.world.bundle = _path(config.world.bundle, relative_to)
    config.server = _section(ServerConfig, data.get("server"), f"{where}: server")
    config.limits = _section(Limits, data.get("limits"), f"{where}: limits")
    _check_server(config.server, f"{where}: server")
    for owner, defaults in [("world", config.world.defaults)] + [
        (m.method, m.defaults) for m in config.models
    ]:
        _known(defaults, set(DEFAULTABLE), f"{where}: {owner}.defaults")
    return config


def _model(name: str, entry: Any, where: str, relative_to: Path | None) -> ModelConfig:
    if not isinstance(entry, dict):
        raise IdcraftError(f"{where}: expected a mapping with base, adapter, ... .")
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"method"}
    _known(entry, fields, where)
    for required in ("base", "adapter"):
        if not entry.get(required):
            raise IdcraftError(f"{where}: {required} is required.")
    values = dict(entry)
    for key in ("base", "adapter", "image_encoder", "image_encoder_2", "face_models"):
        if values.get(key) is not None:
            values[key] = _path(values[key], relative_to)
    if isinstance(values.get("controlnet"), (list, tuple)):
        values["controlnet"] = [_path(c, relative_to) for c in values["controlnet"]]
    elif values.get("controlnet") is not None:
        values["controlnet"] = _path(values["controlnet"], relative_to)
    values["defaults"] = dict(values.get("defaults") or {})
    return ModelConfig(method=name, **values)


def _section(cls, data: Any, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise IdcraftError(f"{where}: expected a mapping.")
    names = {f.name: f for f in dataclasses.fields(cls)}
    _known(data, set(names), where)
    values = {}
    for key, value in data.items():
        default = names[key].default
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise IdcraftError(f"{where}.{key}: expected a number, got {value!r}.")
            if isinstance(default, int) and not float(value).is_integer():
                raise IdcraftError(f"{where}.{key}: expected a whole number, got {value!r}.")
            value = int(value) if isinstance(default, int) else float(value)
        values[key] = value
    return cls(**values)


def _check_server(server: ServerConfig, where: str) -> None:
    for name in (
        "concurrency_per_device",
        "max_body_bytes",
        "max_image_pixels",
        "cache_entries",
        "reference_entries",
    ):
        if getattr(server, name) < 1:
            raise IdcraftError(f"{where}.{name} must be at least 1.")
    for name in ("queue_length", "cache_bytes", "reference_bytes"):
        if getattr(server, name) < 0:
            raise IdcraftError(f"{where}.{name} must be 0 or more.")
    if not server.request_timeout_s > 0:
        raise IdcraftError(f"{where}.request_timeout_s must be more than 0.")
    if isinstance(server.cors_origins, str):
        server.cors_origins = [server.cors_origins]


def _known(data: dict, allowed: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise IdcraftError(f"{where}: expected a mapping.")
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise IdcraftError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}."
        )


def _path(value: Any, relative_to: Path | None) -> str | None:
    """A path from the config: ``~`` expanded, relative ones taken from the config's folder when they
    exist there (otherwise left as given: a hub id such as ``h94/IP-Adapter`` stays one)."""
    if value is None:
        return None
    text = os.path.expanduser(str(value))
    if relative_to is not None and not os.path.isabs(text) and (relative_to / text).exists():
        return str(relative_to / text)
    return text
