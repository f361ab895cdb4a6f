"""Errors that reach users.

Every error idcraft raises on purpose is an :class:`IdcraftError`: the command line prints its message
(which says what was wrong and what to do) without a traceback and exits with status 2. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class IdcraftError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class ImageError(IdcraftError):
    """An input image cannot be used (unreadable, corrupt, too large, unsupported mode)."""


class CheckpointError(IdcraftError):
    """An adapter checkpoint cannot be read, or is not what the caller expected."""


class IncompatibleAdapterError(IdcraftError):
    """An adapter does not fit the base model or image encoder it was paired with."""


class ModelLoadError(IdcraftError):
    """A base model or encoder cannot be found locally or on the hub."""


class OutputError(IdcraftError):
    """An output file cannot be written: it exists (and --overwrite was not given), its folder cannot be
    created or written, or its extension names no supported format."""


class FaceError(IdcraftError):
    """Face analysis cannot give a usable face: none found, models missing, or the wrong kind of embedding."""


class Cancelled(IdcraftError):
    """A generation was stopped on purpose (a cancelled job, a client gone, a timeout, Ctrl-C, shutdown)
    between two denoising steps; nothing it would have produced was kept."""
