"""``idcraft serve``'s configuration: which models stay loaded, and the server's limits.

A YAML file (``idcraft serve --config serve.yaml``); every section is optional::

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

``models`` and the settings its entries share (``device``, ``dtype``, ``face_backend``, ``face_models``,
``limits``) are read by :mod:`idcraft.model_config`, as for ``idcraft batch`` and ``eval``; ``world`` and
``server`` are the server's own. Unknown keys are refused with the key's name, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IdcraftError
from ..model_config import (
    DEFAULTABLE,
    ModelsSection,
    check_keys,
    config_path,
    read_config_file,
    read_models,
    read_section,
)


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
    """Load bounds and access (see docs/serve.md)."""

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
    #: Seconds a shutdown waits for requests and jobs in flight before cancelling them (each stops at
    #: its next denoising step); a second SIGTERM/SIGINT cancels them at once.
    shutdown_grace_s: float = 330.0
    #: Seconds a job may take from ``POST /v1/jobs`` to its end (queue wait included); past it, it fails
    #: with a timeout error and stops at its next step.
    job_timeout_s: float = 3600.0
    #: Finished jobs kept for ``GET /v1/jobs/{id}``: the newest ``jobs_kept``, each for ``job_ttl_s`` s.
    jobs_kept: int = 256
    job_ttl_s: float = 3600.0
    #: Seconds a request body may take to arrive in full; past it the answer is 408.
    body_timeout_s: float = 30.0
    #: Reference images offered by ``GET /v1/examples`` (paths), besides the world's.
    examples: list[str] = field(default_factory=list)
    #: Where uploaded references and encoded identities are kept (``--store``): ``memory`` (this process),
    #: a folder path (files; kept across restarts; shareable over a mount) or ``redis://host:port/db``
    #: (shared by every replica). See docs/serve-scaling.md.
    store: str = "memory"
    #: Bounds of the shared identity tier (folder or Redis); ``cache_*`` bound the hot tier in memory.
    store_cache_entries: int = 16384
    store_cache_bytes: int = 8 * 1024 * 1024 * 1024
    #: Seconds a store that failed is left alone (the identity cache answers without it meanwhile).
    store_retry_s: float = 5.0


@dataclass
class RayConfig:
    """``idcraft serve --ray``: the server as a Ray Serve deployment (see docs/serve-scaling.md)."""

    #: Ray cluster to join (``auto``: the one this machine belongs to; null: start a local one).
    address: str | None = None
    #: Fixed number of replicas; ignored when ``autoscaling`` is set.
    replicas: int = 1
    #: Ray Serve autoscaling on queue length, e.g. ``{min_replicas: 1, max_replicas: 4,
    #: target_ongoing_requests: 2}`` (Ray Serve's ``autoscaling_config``).
    autoscaling: dict[str, Any] | None = None
    #: Resources of one replica (``ray_actor_options``): one GPU each by default; 0 on CPU-only clusters.
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    #: Requests one replica accepts at once (queued in it); the rest wait in Ray's proxy.
    max_ongoing_requests: int = 8
    #: Seconds Ray gives a replica to drain at shutdown or a scale-down.
    graceful_shutdown_timeout_s: float = 60.0


@dataclass
class ServeConfig(ModelsSection):
    """The models served (by :mod:`idcraft.model_config`), the offline world and the server's bounds."""

    world: WorldConfig = field(default_factory=WorldConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def uses_world(self) -> bool:
        return not self.models


def load_config(path: str | os.PathLike | None = None) -> ServeConfig:
    """The configuration in the YAML file at ``path`` (``None``: every default, serving the world)."""
    if path is None:
        return ServeConfig()
    data, folder = read_config_file(path)
    return config_from_dict(data, where=str(path), relative_to=folder)


def config_from_dict(data: Any, *, where: str = "config", relative_to: Path | None = None) -> ServeConfig:
    """A :class:`ServeConfig` from parsed YAML/JSON, every key checked. Relative model paths are taken
    from ``relative_to`` (the config file's folder) when such a file or folder exists there."""
    config = ServeConfig(**read_models(data, ("world", "server", "ray"), where, relative_to))
    config.world = read_section(WorldConfig, data.get("world"), f"{where}: world")
    config.world.bundle = config_path(config.world.bundle, relative_to)
    check_keys(config.world.defaults, set(DEFAULTABLE), f"{where}: world.defaults")
    config.server = read_section(ServerConfig, data.get("server"), f"{where}: server")
    _check_server(config.server, f"{where}: server")
    config.ray = read_section(RayConfig, data.get("ray"), f"{where}: ray")
    _check_ray(config.ray, f"{where}: ray")
    return config


def _check_server(server: ServerConfig, where: str) -> None:
    for name in (
        "concurrency_per_device",
        "max_body_bytes",
        "max_image_pixels",
        "cache_entries",
        "reference_entries",
        "store_cache_entries",
    ):
        if getattr(server, name) < 1:
            raise IdcraftError(f"{where}.{name} must be at least 1.")
    for name in ("queue_length", "cache_bytes", "reference_bytes", "store_cache_bytes", "store_retry_s"):
        if getattr(server, name) < 0:
            raise IdcraftError(f"{where}.{name} must be 0 or more.")
    for name in ("request_timeout_s", "job_timeout_s", "job_ttl_s", "body_timeout_s"):
        if not getattr(server, name) > 0:
            raise IdcraftError(f"{where}.{name} must be more than 0.")
    if server.jobs_kept < 0:
        raise IdcraftError(f"{where}.jobs_kept must be 0 or more.")
    if isinstance(server.cors_origins, str):
        server.cors_origins = [server.cors_origins]
    if not isinstance(server.store, str) or not server.store.strip():
        raise IdcraftError(f"{where}.store must be memory, a folder path or redis://host:port/db.")


def _check_ray(ray: RayConfig, where: str) -> None:
    for name in ("replicas", "max_ongoing_requests"):
        if getattr(ray, name) < 1:
            raise IdcraftError(f"{where}.{name} must be at least 1.")
    for name in ("num_gpus", "num_cpus", "graceful_shutdown_timeout_s"):
        if getattr(ray, name) < 0:
            raise IdcraftError(f"{where}.{name} must be 0 or more.")
    if ray.autoscaling is not None and not isinstance(ray.autoscaling, dict):
        raise IdcraftError(
            f"{where}.autoscaling must be a mapping such as {{min_replicas: 1, max_replicas: 4}}."
        )
