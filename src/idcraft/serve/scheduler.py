"""Load bounds: a queue of limited length in front of a limited number of generations per device.

A request first takes a place in the queue (none left: 429 with Retry-After), waits on the event loop
for a slot on its method's device (``concurrency_per_device`` of them), then runs in a worker thread;
the event loop never blocks on a model. Each request has a deadline: past it while queued, it leaves the
queue without running; past it while running, the client gets 504 at once and the thread finishes its
call (a diffusion call cannot be interrupted safely) still holding the slot, so the device is never
oversubscribed. Shutdown waits for every thread.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .errors import ApiError

T = TypeVar("T")


class Deadline:
    """A point in time requests are checked against (``time.monotonic``)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    @property
    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self, stage: str = "") -> None:
        if self.left <= 0:
            raise timed_out(self.seconds, stage)


def timed_out(seconds: float, stage: str = "") -> ApiError:
    where = f" ({stage})" if stage else ""
    return ApiError(
        504,
        "timeout",
        f"the request took longer than this server's limit of {seconds:g} s{where}; try fewer steps or images.",
    )


class Scheduler:
    """``run(device, fn, deadline)``: ``fn()`` in a worker thread once a slot on ``device`` is free."""

    def __init__(self, devices: list[str], *, concurrency: int = 1, queue_length: int = 16):
        self.concurrency = concurrency
        self.queue_length = queue_length
        self._slots = {device: asyncio.Semaphore(concurrency) for device in devices}
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, concurrency * len(devices)), thread_name_prefix="idcraft-generate"
        )
        self.waiting = 0
        self.running = 0
        self.closed = False
        self._recent: list[float] = []  # seconds of the last runs, for Retry-After

    async def run(self, device: str, fn: Callable[[], T], deadline: Deadline) -> T:
        if self.closed:
            raise ApiError(503, "unavailable", "the server is shutting down; try again shortly.")
        slot = self._slots[device]
        if not slot.locked():
            await slot.acquire()  # free: taken at once, with no suspension in between
        else:
            if self.waiting >= self.queue_length:
                raise ApiError(
                    429,
                    "queue_full",
                    f"the queue is full ({self.waiting} requests waiting); retry after a few seconds.",
                    headers={"Retry-After": str(self.retry_after())},
                )
            self.waiting += 1
            try:
                await asyncio.wait_for(slot.acquire(), timeout=max(deadline.left, 0.0))
            except asyncio.TimeoutError:
                raise timed_out(deadline.seconds, "waiting in the queue") from None
            finally:
                self.waiting -= 1
        self.running += 1
        loop = asyncio.get_running_loop()
        started = time.monotonic()

        def release(_future: Any) -> None:
            def done() -> None:
                self.running -= 1
                self._recent = (self._recent + [time.monotonic() - started])[-20:]
                slot.release()

            try:
                loop.call_soon_threadsafe(done)
            except RuntimeError:  # the loop is gone (shutdown): nothing waits on this slot any more
                pass

        try:
            future = self._executor.submit(fn)
        except RuntimeError:  # the executor was shut down between the checks above and here
            self.running -= 1
            slot.release()
            raise ApiError(503, "unavailable", "the server is shutting down; try again shortly.") from None
        future.add_done_callback(release)
        try:
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), timeout=max(deadline.left, 0.0)
            )
        except asyncio.TimeoutError:
            raise timed_out(deadline.seconds, "generating") from None

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the recent mean run time x the queue ahead / slots."""
        mean = sum(self._recent) / len(self._recent) if self._recent else 1.0
        slots = max(1, self.concurrency * len(self._slots))
        return max(1, math.ceil(mean * (self.waiting + 1) / slots))

    def close(self) -> None:
        """Refuse new work and wait for every thread (those of timed-out requests too)."""
        self.closed = True
        self._executor.shutdown(wait=True)
