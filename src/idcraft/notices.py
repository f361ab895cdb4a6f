"""Third-party log lines a user of idcraft cannot act on, dropped exactly at the logger that writes them.

Loading the world (or any SD1.5/SDXL base) through idcraft made diffusers and transformers print notices
about their own internals. Each is matched here by its message, on the one logger that emits it, so every
other warning of those libraries still shows:

* diffusers, ``There are modules in UNet2DConditionModel that should be kept in float32: []``: printed on
  every ``.to(dtype)`` of a diffusers model, including ``from_pipe``'s cast of each component to the dtype
  it already has; with an empty list there is nothing to keep in float32.
* transformers, ``CLIPImageProcessor requires torchvision (not installed); falling back to
  CLIPImageProcessorPil``: printed when diffusers' pipeline modules import those classes. idcraft never
  uses diffusers' processors and picks the PIL processor itself (:mod:`idcraft.encoders.clip`).

No torch import here; :func:`drop_library_notices` is cheap and idempotent, and is called by the loaders
before they import diffusers' pipelines.
"""

from __future__ import annotations

import logging
import re

#: logger name -> the messages dropped there (a regular expression searched in the formatted message).
DROPPED: dict[str, re.Pattern[str]] = {
    "diffusers.models.modeling_utils": re.compile(r"should be kept in float32: \[\]\."),
    "transformers.utils.import_utils": re.compile(
        r"requires torchvision \(not installed\); falling back to `\w+Pil`"
    ),
}


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


def drop_library_notices() -> None:
    """Attach the filters of :data:`DROPPED` to their loggers (once each)."""
    for name, pattern in DROPPED.items():
        source = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in source.filters):
            source.addFilter(_DropMatching(pattern))
