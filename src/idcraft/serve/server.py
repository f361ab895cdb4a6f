"""Running the application under uvicorn, with a graceful shutdown.

The first SIGINT/SIGTERM stops accepting connections and new work (503); requests and jobs in flight
may finish within ``server.shutdown_grace_s``; past it they are cancelled (each stops at its next
denoising step) and the worker threads are waited for. A second SIGINT or SIGTERM cancels everything at
once and exits without waiting for the grace period."""

from __future__ import annotations

import logging
import threading

from .catalog import Catalog, build_catalog
from .config import ServeConfig

log = logging.getLogger("idcraft.serve")


def uvicorn_server(
    app, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
):
    """A ``uvicorn.Server`` for ``app`` (call ``.run()``; ``.should_exit = True`` stops it gracefully)."""
    import uvicorn

    settings = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=config.server.shutdown_grace_s,
        limit_concurrency=None,
        server_header=False,
    )
    return _stopping_server_class()(settings, service=getattr(app.state, "service", None))


def _stopping_server_class():
    """``uvicorn.Server`` whose stop signals reach the service (see the module docstring); built on first
    use, as uvicorn is imported only when serving."""
    import asyncio

    import uvicorn

    class StoppingServer(uvicorn.Server):
        def __init__(self, config, service=None):
            super().__init__(config)
            self.service = service
            self.loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            again = self.should_exit
            super().handle_exit(sig, frame)
            if again:
                self.force_exit = True  # uvicorn forces only on a second SIGINT; SIGTERM too here
            if self.service is None or self.loop is None or self.loop.is_closed():
                return
            if again:
                reason = "the server was stopped at once (a second stop signal)"
                self.loop.call_soon_threadsafe(self.service.cancel_all, reason)
            else:
                self.loop.call_soon_threadsafe(self.service.begin_shutdown)

    return StoppingServer


def serve(
    config: ServeConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    catalog: Catalog | None = None,
    log_level: str = "info",
) -> None:
    """Load the models (or the offline world) and serve until interrupted."""
    from .app import create_app

    config = config or ServeConfig()
    catalog = catalog if catalog is not None else build_catalog(config)
    app = create_app(config, catalog)
    uvicorn_server(app, config, host, port, log_level).run()


class BackgroundServer:
    """A real uvicorn server in a thread, for tests and benchmarks: ``with BackgroundServer(app) as s:``
    then ``s.url``. Leaving the block stops it gracefully (requests in flight finish)."""

    def __init__(self, app, config: ServeConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        import socket

        if port == 0:
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn_server(app, config or ServeConfig(), host, port, log_level="warning")
        self.server.config.timeout_graceful_shutdown = 60
        self.thread = threading.Thread(target=self.server.run, name="idcraft-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
