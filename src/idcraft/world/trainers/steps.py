"""What the world's trainers share in their step loops: the batch order and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of row indices ``< n``: a permutation drawn from ``generator`` is walked in order
    and redrawn when too few rows are left for a whole batch (the first one is drawn on the first batch,
    so nothing else may draw from ``generator`` in between for a run to repeat)."""
    order, cursor = torch.randperm(n, generator=generator), 0
    while True:
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        yield order[cursor : cursor + batch_size]
        cursor += batch_size


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int):
    """Linear warm-up over ``warmup`` steps (none for 0), then a cosine decay to zero at ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )
