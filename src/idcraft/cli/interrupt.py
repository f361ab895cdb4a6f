"""Ctrl-C during a generation: the first one cancels it cleanly at the next denoising step (nothing is
written; the command says "interrupted" and exits 130), a second one interrupts at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from ..cancel import CancelToken


@contextlib.contextmanager
def cancel_on_interrupt(token: CancelToken) -> Iterator[CancelToken]:
    """Within the block, SIGINT cancels ``token`` (a second SIGINT raises KeyboardInterrupt as usual).
    Outside the main thread (where signals cannot be handled) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield token
        return

    def on_interrupt(signum, frame) -> None:
        if token.cancelled:
            raise KeyboardInterrupt
        token.cancel("interrupted (Ctrl-C)")

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield token
    finally:
        signal.signal(signal.SIGINT, previous)
