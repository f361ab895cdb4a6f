"""Load bounds: a queue of limited length in front of a limited number of generations per device.

A request is first admitted (:meth:`Scheduler.admit`, synchronous: a free slot on its method's device, or
a place in that device's queue; none left: 429 with Retry-After), then :meth:`Scheduler.execute` waits
on the event loop for its slot (first come, first served) and runs the work in a worker thread; the
event loop never blocks on a model. Each request has a deadline and a :class:`~idcraft.cancel.CancelToken`:
past the deadline while queued, it leaves the queue without running; past it while running, the client
gets 504 at once and the token is cancelled, so the generation stops at its next denoising step. A
request whose waiter goes away (client disconnected, shutdown) is cancelled the same way. The slot is
released only when the thread has ended, so the device is never oversubscribed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..cancel import CancelToken
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


def unavailable() -> ApiError:
    return ApiError(503, "unavailable", "the server is shutting down; try again shortly.")


@dataclass(eq=False)
class Ticket:
    """One admitted request: it holds a slot on ``device`` (``granted`` done) or waits in its queue."""

    device: str
    granted: asyncio.Future = field(repr=False)

    @property
    def holds_slot(self) -> bool:
        return self.granted.done() and not self.granted.cancelled()


class Scheduler:
    """``admit(device)`` then ``await execute(ticket, fn, deadline, cancel)``: ``fn()`` in a worker thread
    once a slot on ``device`` is free (``run`` does both)."""

    def __init__(self, devices: list[str], *, concurrency: int = 1, queue_length: int = 16):
        self.concurrency = concurrency
        self.queue_length = queue_length
        self._free = {device: concurrency for device in devices}
        self._queues: dict[str, deque[Ticket]] = {device: deque() for device in devices}
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, concurrency * len(devices)), thread_name_prefix="idcraft-generate"
        )
        self._tokens: set[CancelToken] = set()  # of everything admitted and not yet ended
        #: Called (on the event loop) whenever a queue moves: places in it have changed.
        self.on_queue_change: Callable[[], None] | None = None
        self.running = 0
        self.closed = False
        self._recent: list[float] = []  # seconds of the last runs, for Retry-After

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def position(self, ticket: Ticket) -> int | None:
        """1 for the next request to get a slot on its device; ``None`` once it holds one."""
        try:
            return self._queues[ticket.device].index(ticket) + 1
        except ValueError:
            return None

    def admit(self, device: str) -> Ticket:
        """A slot on ``device`` taken at once, or a place in its queue (429 when the queue is full, 503
        while shutting down). Call from the event loop; no suspension, so a burst is admitted exactly."""
        if self.closed:
            raise unavailable()
        ticket = Ticket(device, asyncio.get_running_loop().create_future())
        if self._free[device] > 0:
            self._free[device] -= 1
            ticket.granted.set_result(None)
            return ticket
        if self.waiting >= self.queue_length:
            raise ApiError(
                429,
                "queue_full",
                f"the queue is full ({self.waiting} requests waiting); retry after a few seconds.",
                headers={"Retry-After": str(self.retry_after())},
            )
        self._queues[device].append(ticket)
        return ticket

    async def run(
        self, device: str, fn: Callable[[], T], deadline: Deadline, cancel: CancelToken | None = None
    ) -> T:
        return await self.execute(self.admit(device), fn, deadline, cancel)

    async def execute(
        self,
        ticket: Ticket,
        fn: Callable[[], T],
        deadline: Deadline,
        cancel: CancelToken | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> T:
        """Wait for ``ticket``'s slot, then run ``fn`` in a worker thread. On the deadline (504) or when
        this coroutine is cancelled, ``cancel`` is cancelled too, so ``fn`` can stop early."""
        cancel = cancel or CancelToken()
        self._tokens.add(cancel)
        try:
            await self._slot(ticket, deadline)
            if on_start is not None:
                on_start()
            return await self._in_thread(ticket, fn, deadline, cancel)
        finally:
            self._tokens.discard(cancel)

    async def _slot(self, ticket: Ticket, deadline: Deadline) -> None:
        if ticket.holds_slot:
            return
        try:
            await asyncio.wait_for(asyncio.shield(ticket.granted), timeout=max(deadline.left, 0.0))
        except BaseException as exc:  # timed out or cancelled while waiting: leave the queue
            self._leave(ticket)
            if isinstance(exc, asyncio.TimeoutError):
                raise timed_out(deadline.seconds, "waiting in the queue") from None
            raise

    def _leave(self, ticket: Ticket) -> None:
        if ticket.holds_slot:  # handed a slot in the same instant: pass it on
            self._release(ticket.device)
            return
        ticket.granted.cancel()
        try:
            self._queues[ticket.device].remove(ticket)
        except ValueError:
            return
        self._queue_changed()

    def _release(self, device: str) -> None:
        queue = self._queues[device]
        while queue:
            waiter = queue.popleft()
            if not waiter.granted.done():
                waiter.granted.set_result(None)
                self._queue_changed()
                return
        self._free[device] += 1

    def _queue_changed(self) -> None:
        if self.on_queue_change is not None:
            self.on_queue_change()

    async def _in_thread(
        self, ticket: Ticket, fn: Callable[[], T], deadline: Deadline, cancel: CancelToken
    ) -> T:
        loop = asyncio.get_running_loop()
        started = time.monotonic()

        def release(_future: Any) -> None:
            def done() -> None:
                self.running -= 1
                self._recent = (self._recent + [time.monotonic() - started])[-20:]
                self._release(ticket.device)

            try:
                loop.call_soon_threadsafe(done)
            except RuntimeError:  # the loop is gone (shutdown): nothing waits on this slot any more
                pass

        try:
            future = self._executor.submit(fn)
        except RuntimeError:  # the executor was shut down between the checks above and here
            self._release(ticket.device)
            raise unavailable() from None
        self.running += 1
        future.add_done_callback(release)
        try:
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), timeout=max(deadline.left, 0.0)
            )
        except asyncio.TimeoutError:
            cancel.cancel(f"past this server's limit of {deadline.seconds:g} s")
            raise timed_out(deadline.seconds, "generating") from None
        except asyncio.CancelledError:  # the waiter went away (client gone, shutdown): stop the work
            cancel.cancel("the request was abandoned")
            raise

    def cancel_all(self, reason: str) -> None:
        """Cancel every request admitted and not yet ended (running ones stop at their next step)."""
        for token in list(self._tokens):
            token.cancel(reason)

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the recent mean run time x the queue ahead / slots."""
        mean = sum(self._recent) / len(self._recent) if self._recent else 1.0
        slots = max(1, self.concurrency * len(self._free))
        return max(1, math.ceil(mean * (self.waiting + 1) / slots))

    def close(self, wait: bool = True) -> None:
        """Refuse new work; with ``wait``, wait for every thread (those of timed-out requests too)."""
        self.closed = True
        if wait:
            self._executor.shutdown(wait=True)
