"""Jobs: a generation that runs after its ``POST /v1/jobs`` has been answered (202), followed by polling
``GET /v1/jobs/{id}``, by server-sent events, or cancelled with ``DELETE``.

A :class:`Job` is the state a client sees (its JSON is the API's contract: the web page reads these field
names); :class:`JobStore` keeps jobs by id and drops finished ones after ``job_ttl_s`` seconds or beyond
the newest ``jobs_kept``. The work itself runs through the same admission, queue and device slots as
``POST /v1/images/generations`` (:class:`~.service.Service` drives it); every change wakes the event
streams watching the job.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..cancel import CancelToken
from .errors import not_found

#: States a job ends in.
FINISHED = ("succeeded", "failed", "cancelled")


@dataclass(eq=False)
class Job:
    """One job's state; ``describe()`` is its JSON."""

    id: str
    created: float
    total_steps: int
    state: str = "queued"
    step: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    finished: float | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    task: asyncio.Task | None = None
    #: Reads the job's place in the queue (``None`` once it holds a device slot).
    position: Callable[[], int | None] = lambda: None
    version: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.state in FINISHED

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "job",
            "state": self.state,
            "step": self.step,
            "total_steps": self.total_steps,
            "queue_position": self.position() if self.state == "queued" else None,
            "result": self.result,
            "error": self.error,
            "created": int(self.created),
            "finished": None if self.finished is None else int(self.finished),
        }

    # Changes, all on the event loop (the worker thread reaches them with call_soon_threadsafe).
    def started(self) -> None:
        if not self.done:
            self.state = "running"
            self._notify()

    def moved(self) -> None:
        """Its place in the queue may have changed."""
        if self.state == "queued":
            self._notify()

    def progress(self, step: int, total: int) -> None:
        if not self.done:
            self.step, self.total_steps = step, total
            self._notify()

    def finish(self, state: str, *, result=None, error: dict[str, str] | None = None) -> None:
        if self.done:
            return
        self.state, self.result, self.error = state, result, error
        self.finished = time.time()
        self._notify()

    def _notify(self) -> None:
        self.version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def changed(self, version: int, timeout: float) -> bool:
        """Wait until the job has changed since ``version`` (``False`` after ``timeout`` seconds)."""
        if self.version != version:
            return True
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


class JobStore:
    """Jobs by id; finished ones are dropped after ``ttl_s`` seconds or beyond the newest ``kept``."""

    def __init__(self, kept: int, ttl_s: float):
        self.kept = kept
        self.ttl_s = ttl_s
        self._jobs: dict[str, Job] = {}

    def create(self, total_steps: int) -> Job:
        self.prune()
        job = Job(id=f"job_{secrets.token_hex(16)}", created=time.time(), total_steps=total_steps)
        self._jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job:
        self.prune()
        job = self._jobs.get(job_id)
        if job is None:
            raise not_found(
                f"no such job: {job_id!r} (finished jobs are kept for {self.ttl_s:g} s, the newest "
                f"{self.kept}; ids look like job_ followed by 32 hex digits)."
            )
        return job

    def active(self) -> list[Job]:
        return [job for job in self._jobs.values() if not job.done]

    def prune(self) -> None:
        now = time.time()
        finished = sorted(
            (job for job in self._jobs.values() if job.done), key=lambda job: job.finished or 0.0
        )
        expired = [job for job in finished if now - (job.finished or now) > self.ttl_s]
        surplus = finished[: max(0, len(finished) - self.kept)]
        for job in (*expired, *surplus):
            self._jobs.pop(job.id, None)

    def __len__(self) -> int:
        return len(self._jobs)


def sse(event: str, data: str) -> str:
    """One server-sent event (``data`` is one line of JSON)."""
    return f"event: {event}\ndata: {data}\n\n"
