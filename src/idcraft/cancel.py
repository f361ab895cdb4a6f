"""Stopping a generation between denoising steps, and watching its steps.

A diffusion call cannot be interrupted in the middle of a step safely, but between two steps it holds
nothing a caller needs: :class:`CancelToken` is the flag a caller sets (from any thread), and
:func:`step_hook` gives the pipelines one function to call after every step, which reports progress and
raises :class:`~idcraft.errors.Cancelled` once the flag is set. Both travel with the call (arguments of
:meth:`idcraft.engine.Engine.generate`), never on the engine or a pipeline, so concurrent requests on one
engine are cancelled one by one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .errors import Cancelled

#: ``progress(done, total)``: called after each denoising step, from the thread that runs the call.
Progress = Callable[[int, int], None]
#: ``hook(done, total)``: what a pipeline calls after each step (may raise :class:`Cancelled`).
StepHook = Callable[[int, int], None]


class CancelToken:
    """A one-way flag: ``cancel(reason)`` from anywhere; the generation stops at its next step boundary
    with :class:`Cancelled` carrying the reason. Thread-safe; cancelling twice keeps the first reason."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.reason = ""

    def cancel(self, reason: str = "cancelled") -> None:
        with self._lock:
            if not self._event.is_set():
                self.reason = reason
                self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if the token was cancelled."""
        if self._event.is_set():
            raise Cancelled(self.reason)

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


def step_hook(cancel: CancelToken | None, progress: Progress | None) -> StepHook | None:
    """The per-step function for a call with this token and progress callback (``None``: nothing to do,
    the pipelines then pass no callback at all)."""
    if cancel is None and progress is None:
        return None

    def hook(done: int, total: int) -> None:
        if cancel is not None:
            cancel.check()
        if progress is not None:
            progress(done, total)

    return hook


def diffusers_callback(hook: StepHook | None, total: int) -> dict:
    """Keyword arguments that make a diffusers pipeline call ``hook(step + 1, total)`` after each
    denoising step (``callback_on_step_end``); empty without a hook."""
    if hook is None:
        return {}

    def on_step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        hook(step + 1, int(getattr(pipe, "num_timesteps", None) or total))
        return callback_kwargs

    return {"callback_on_step_end": on_step_end}
