"""``idcraft serve``: an HTTP API and a web page over :class:`idcraft.engine.Engine`.

Modules, one job each: :mod:`.config` (the YAML file), :mod:`.catalog` (what stays loaded),
:mod:`.service` (requests -> engine calls, identity cache), :mod:`.scheduler` (queue, slots per device,
timeouts), :mod:`.cache` (bounded LRU stores), :mod:`.stores` (references and the identity cache in
memory, a folder or Redis: ``--store``), :mod:`.images` (untrusted image bytes), :mod:`.errors`
(failures -> HTTP statuses, in one place), :mod:`.metrics` (Prometheus text), :mod:`.middleware` (body
bound, 500 guard), :mod:`.edits` (OpenAI's multipart ``/v1/images/edits`` -> a request), :mod:`.app`
(routes), :mod:`.server` (uvicorn), :mod:`.ray_app` (replicas on Ray Serve: ``--ray``). See
docs/serve.md, docs/serve-openai.md and docs/serve-scaling.md.
"""

from __future__ import annotations

from .config import ServeConfig, config_from_dict, load_config

__all__ = ["ServeConfig", "config_from_dict", "create_app", "load_config", "serve"]


def create_app(*args, **kwargs):
    from .requirements import require_server_packages

    require_server_packages("idcraft.serve.create_app")
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def serve(*args, **kwargs):
    from .requirements import require_server_packages

    require_server_packages("idcraft.serve.serve")
    from .server import serve as _serve

    return _serve(*args, **kwargs)
