"""``idcraft serve`` (and other servers) as subprocesses for the tests: a free local port, the server
started as a user starts it, and readiness polled -- never a fixed sleep, which is either too short on a
busy CI machine or wasted time on a free one.

One helper for every test that starts a server process, so that the environment it runs in (no API
token from the caller's shell, offline hub, few threads) and the way its start-up failure is reported
(the process's own output) are the same everywhere.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx


def free_port() -> int:
    """A local TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``condition`` until it holds; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} (waited {timeout:.0f} s)"
        time.sleep(interval)


class ServeProcess:
    """A running ``idcraft serve`` on ``port``; ``url`` is its base address."""

    def __init__(self, process: subprocess.Popen, port: int):
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, path: str = "/healthz", timeout: float = 120.0) -> None:
        """Poll ``path`` until it answers 200; a process that exits meanwhile fails with its output."""

        def answered() -> bool:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                return httpx.get(self.url + path, timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answered, timeout, f"idcraft serve did not answer {path} on {self.url}", interval=0.1)

    def output(self) -> str:
        """Everything the process printed (call after it exited)."""
        return self.process.stdout.read()


def serve_command(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "idcraft", "serve", "--port", str(port), "--device", "cpu", *extra]


@contextmanager
def serve_process(*extra: str, threads: int = 2) -> Iterator[ServeProcess]:
    """``idcraft serve --port FREE --device cpu EXTRA...`` in a subprocess, killed on exit if still alive.

    The caller's ``IDCRAFT_API_TOKEN`` is removed (the tests call without a token), the hub is offline and
    torch uses ``threads`` threads (the CI machine has two cores for the test and the server together).
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "IDCRAFT_API_TOKEN"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    process = subprocess.Popen(
        serve_command(port, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        yield ServeProcess(process, port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
