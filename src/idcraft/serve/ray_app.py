"""``idcraft serve --ray``: the same FastAPI application as replicas of a Ray Serve deployment.

Two deployments make the application:

* ``Replica`` (``replicas`` of them, or autoscaled on queue length; one GPU each by default) builds the
  server's own app (:func:`idcraft.serve.app.create_app`: routes, errors, limits, metrics, its lifespan)
  on its models and answers each HTTP request handed to it, in process, through the app. Its answers
  carry ``X-Idcraft-Replica`` so a client, a test or a log can see which replica answered; its
  ``/metrics`` are its own.
* ``Gateway`` is the HTTP ingress: it passes each request, whole, to a replica through a Ray deployment
  handle, and when that replica dies before answering (a crash, a node lost) it passes the request to
  another; with none left it answers 503 with Retry-After. So a replica killed under load loses no
  accepted request, and Ray Serve starts a new replica in its place.

References and the identity cache live in the shared store (``server.store``: Redis, or a folder on a
shared mount), so an upload to one replica serves on every other and one replica's encoding is another's
cache hit. A replica on the ``memory`` store would keep its own: :func:`build` warns.

Run it with ``idcraft serve --ray`` (:func:`run`), or with Ray's own tools through :func:`app_builder`:
``serve run idcraft.serve.ray_app:app_builder config=serve.yaml replicas=2`` (or ``import_path:`` in a
Serve config file). See docs/serve-scaling.md.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..errors import IdcraftError
from .config import ServeConfig, load_config

log = logging.getLogger("idcraft.serve")

#: Headers that describe one hop, not the request (httpx sets its own length and host).
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
#: Times a request goes to another replica after the one it was given died.
RETRIES = 2


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise IdcraftError("idcraft serve --ray needs Ray Serve: pip install 'idcraft[ray]'.") from exc
    return ray, serve


class ReplicaApp:
    """One replica: the server's app on its own models, answering requests passed to it whole."""

    def __init__(self, config: ServeConfig):
        import httpx

        from .app import create_app

        self.app = create_app(config)
        self.name = _replica_name()
        self._lifespan = self.app.router.lifespan_context(self.app)
        self._started = False
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False),
            base_url="http://replica",
            timeout=None,
        )

    async def start(self) -> None:
        await self._lifespan.__aenter__()  # Service.start(): the scheduler, the examples
        self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self.client.aclose()
            await self._lifespan.__aexit__(None, None, None)  # drains the requests in flight

    async def answer(self, request: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = [(k, v) for k, v in request["headers"] if k.lower() not in HOP_HEADERS]
        response = await self.client.request(
            request["method"],
            request["path"],
            params=request["query"] or None,
            headers=headers,
            content=request["body"],
        )
        out = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in HOP_HEADERS]
        out += [("x-idcraft-replica", self.name), ("x-idcraft-replica-pid", str(os.getpid()))]
        return response.status_code, out, response.content

    def healthy(self) -> bool:
        scheduler = self.app.state.service.scheduler
        return self._started and scheduler is not None and not scheduler.closed


def _replica_name() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Ray replica (a test of the class itself)
        return f"pid-{os.getpid()}"


async def forward(handle, request, retries: int = RETRIES, retry_after_s: int = 5, timeout_s: float = 300.0):
    """``request`` (a Starlette request) answered by a replica behind ``handle``; another replica when
    the first dies before answering; 503 with Retry-After when none can; 504 past ``timeout_s`` (every
    replica gone and none back yet)."""
    import asyncio

    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from starlette.responses import JSONResponse, Response

    payload = {
        "method": request.method,
        "path": request.url.path,
        "query": request.url.query,
        "headers": list(request.headers.items()),
        "body": await request.body(),
    }
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    for attempt in range(retries + 1):
        try:
            status, headers, body = await asyncio.wait_for(
                _answer(handle, payload), max(0.0, deadline - loop.time())
            )
        except TimeoutError:
            return JSONResponse(
                {"error": {"type": "timeout", "message": f"no replica answered within {timeout_s:g} s."}},
                status_code=504,
            )
        except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
            log.warning(
                "replica lost while answering %s %s (%s); try %d",
                request.method,
                request.url.path,
                exc,
                attempt + 1,
            )
            continue
        response = Response(body, status_code=status)
        for key, value in headers:
            response.headers.append(key, value)
        if attempt:
            response.headers["x-idcraft-retried"] = str(attempt)  # replicas lost on the way
        return response
    return JSONResponse(
        {
            "error": {
                "type": "unavailable",
                "message": "no replica could answer now (they are restarting); try again shortly.",
            }
        },
        status_code=503,
        headers={"Retry-After": str(retry_after_s)},
    )


async def _answer(handle, payload):
    return await handle.answer.remote(payload)


def build(config: ServeConfig):
    """The Ray Serve application (``Gateway`` bound to ``Replica``) for ``config``."""
    _, serve = _ray()
    ray_config = config.ray
    if config.server.store == "memory" and (ray_config.replicas > 1 or ray_config.autoscaling):
        log.warning(
            "idcraft serve --ray with the memory store: each replica keeps its own uploads and cache; "
            "use --store redis://host:port/db (or a shared folder) so they share them."
        )
    replica_options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": ray_config.num_gpus, "num_cpus": ray_config.num_cpus},
        "max_ongoing_requests": ray_config.max_ongoing_requests,
        "graceful_shutdown_timeout_s": ray_config.graceful_shutdown_timeout_s,
    }
    if ray_config.autoscaling:
        replica_options["autoscaling_config"] = dict(ray_config.autoscaling)
    else:
        replica_options["num_replicas"] = ray_config.replicas

    @serve.deployment(name="Replica", **replica_options)
    class Replica:
        async def __init__(self, config: ServeConfig):
            self.replica = ReplicaApp(config)
            await self.replica.start()

        async def answer(self, request: dict[str, Any]):
            return await self.replica.answer(request)

        def check_health(self) -> None:
            if not self.replica.healthy():
                raise RuntimeError("the replica's scheduler is closed")

        async def __del__(self):
            await self.replica.stop()

    retry_after = max(1, round(config.server.store_retry_s))
    timeout = config.server.request_timeout_s + 30  # the replica's own 504 comes first when it is alive

    @serve.deployment(
        name="Gateway",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(100, 4 * ray_config.max_ongoing_requests),
    )
    class Gateway:
        def __init__(self, replica):
            self.replica = replica

        async def __call__(self, request):
            return await forward(self.replica, request, RETRIES, retry_after, timeout)

    return Gateway.bind(Replica.bind(config))


def app_builder(args: dict[str, str]):
    """For ``serve run idcraft.serve.ray_app:app_builder config=serve.yaml replicas=2 store=redis://...``
    and Serve config files (``import_path`` + ``args``); every argument is optional."""
    config = load_config(args.get("config"))
    if "store" in args:
        config.server.store = str(args["store"])
    if "replicas" in args:
        config.ray.replicas = int(args["replicas"])
    if "device" in args:
        config.world.device = str(args["device"])
    return build(config)


def run(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start (or join, ``ray.address``) a Ray cluster, deploy, and serve until SIGINT/SIGTERM; then the
    replicas drain (``ray.graceful_shutdown_timeout_s``) and the application is removed."""
    import signal
    import threading

    ray, serve = _ray()
    stop = threading.Event()

    def on_signal(*_) -> None:
        stop.set()

    def catch_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    catch_signals()  # a signal while starting stops it too, once deployed
    ray.init(address=config.ray.address, ignore_reinit_error=True, log_to_driver=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        if config.ray.num_gpus > gpus:
            raise IdcraftError(
                f"each replica asks for {config.ray.num_gpus:g} GPU and the Ray cluster has {gpus:g}: set "
                "ray.num_gpus: 0 in the config (or --device cpu) to run the replicas on CPUs."
            )
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(config), name="idcraft", route_prefix="/")
        catch_signals()  # again: starting Ray may have put its own handlers in place
        print(f"idcraft serve --ray: http://{host}:{port}/ ({_replicas_text(config)})", flush=True)
        while not stop.wait(0.5):
            pass
        print("idcraft serve --ray: stopping (replicas finish the requests in flight)", flush=True)
        serve.delete("idcraft")
        serve.shutdown()
    finally:
        ray.shutdown()


def _replicas_text(config: ServeConfig) -> str:
    if config.ray.autoscaling:
        return f"autoscaling {config.ray.autoscaling}"
    return f"{config.ray.replicas} replica{'s' if config.ray.replicas != 1 else ''}"
