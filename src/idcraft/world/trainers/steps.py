"""What the world's trainers share in their step loops: the batch order and the learning-rate schedule, and
(:class:`FastLoop`) what their fast path on an accelerator adds."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

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


# ---------------------------------------------------------------------------- the accelerator's fast path
#: Default number of steps between two reads of the loss on the fast path (each read is one host sync).
LOG_EVERY = 100


def use_fast_path(device: str | torch.device, fast: bool | None = None) -> bool:
    """Whether a trainer runs its fast step loop: by default on a CUDA device, never on a CPU unless
    ``fast=True`` (which tests use to exercise the same code on the CPU)."""
    return torch.device(device).type == "cuda" if fast is None else bool(fast)


def device_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator that draws on ``device`` (so batches and noise are made where they are used)."""
    return torch.Generator(device=device).manual_seed(seed)


class FastLoop:
    """What a trainer's step loop needs on an accelerator, so that the GPU is never left waiting:

    * ``autocast()``: bfloat16 autocast (float32 master weights; losses are computed in float32);
    * ``adamw(...)``: AdamW with its fused kernel where the device has one;
    * ``batches(n, batch_size)``: endless batches of row indices drawn on the device (a permutation per
      epoch from :attr:`generator`), so data kept on the device is indexed with no host round trip;
    * ``record(step, loss)``: keeps every step's loss in a device tensor and reads them back (one host
      synchronisation) only every ``log_every`` steps, printing one progress line then;
    * a time cap: with ``max_seconds``, :meth:`schedule` anneals the learning rate on the share of the
      budget used when that is ahead of the share of the steps done, and :meth:`out_of_time` ends the
      loop at the budget -- so a stage run on a machine slower than planned still ends on time and with
      its rate decayed (its measurements say where it stopped and why).

    The CPU path of every trainer does not use this class: it stays as it was, bit for bit.
    """

    def __init__(
        self,
        device: str | torch.device,
        steps: int,
        *,
        seed: int,
        desc: str,
        batch_size: int,
        log_every: int = LOG_EVERY,
        max_seconds: float | None = None,
        progress: bool = True,
    ):
        self.device = torch.device(device)
        if self.device.type == "cuda":  # fixed shapes every step: let cuDNN pick its fastest kernels
            torch.backends.cudnn.benchmark = True
        self.steps, self.desc, self.batch_size = int(steps), desc, int(batch_size)
        self.log_every = max(1, int(log_every))
        self.max_seconds = float(max_seconds) if max_seconds else None
        self.progress = progress
        self.generator = device_generator(self.device, seed)
        self.losses = torch.zeros(max(1, self.steps), device=self.device)
        self.steps_done = 0
        self._logged = 0  # steps covered by the lines printed so far
        self.started = time.perf_counter()
        self.stopped_by = "steps"
        self.log: list[str] = []

    # -- setting up
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def adamw(self, params, **kwargs) -> torch.optim.Optimizer:
        fused = self.device.type in ("cuda", "cpu")  # torch's fused AdamW kernels (CPU: torch >= 2.4)
        try:
            return torch.optim.AdamW(params, fused=fused, **kwargs)
        except (RuntimeError, TypeError):  # an older torch or another device: the foreach kernels
            return torch.optim.AdamW(params, **kwargs)

    def batches(self, n: int, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        size = min(int(batch_size or self.batch_size), n)
        order, cursor = torch.randperm(n, generator=self.generator, device=self.device), 0
        while True:
            if cursor + size > n:
                order, cursor = torch.randperm(n, generator=self.generator, device=self.device), 0
            yield order[cursor : cursor + size]
            cursor += size

    def progress_share(self, step: int, steps: int | None = None) -> float:
        """The share of the run done at ``step`` (of ``steps``, default the loop's): of the steps, or of
        the time budget where that is ahead."""
        share = step / max(1, self.steps if steps is None else steps)
        if self.max_seconds:
            share = max(share, (time.perf_counter() - self.started) / self.max_seconds)
        return min(1.0, share)

    def schedule(self, optimizer: torch.optim.Optimizer, warmup: int, steps: int | None = None):
        """Linear warm-up over ``warmup`` steps times a cosine decay over :meth:`progress_share` (of
        ``steps``, default the loop's: a model trained for fewer steps than the loop runs)."""
        warmup = max(1, int(warmup))
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: (
                min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * self.progress_share(s, steps)))
            ),
        )

    def start(self) -> None:
        """Start the clock (call just before the first step)."""
        self.started = time.perf_counter()

    # -- each step
    def out_of_time(self) -> bool:
        if self.max_seconds and time.perf_counter() - self.started >= self.max_seconds:
            self.stopped_by = "time"
            return True
        return False

    def record(self, step: int, loss: torch.Tensor, extra: dict[str, torch.Tensor] | None = None) -> None:
        self.losses[step] = loss.detach().float()
        self.steps_done = step + 1
        if self.steps_done % self.log_every == 0 or self.steps_done == self.steps:
            self._print(extra)

    def _print(self, extra: dict[str, torch.Tensor] | None = None) -> None:
        lo, self._logged = self._logged, self.steps_done
        mean = float(self.losses[lo : self.steps_done].mean())  # the one synchronisation per log line
        seconds = time.perf_counter() - self.started
        rate = self.steps_done * self.batch_size / max(seconds, 1e-9)
        parts = [f"{k} {float(v.detach()):.4f}" for k, v in (extra or {}).items()]
        line = (
            f"[{self.desc}] step {self.steps_done}/{self.steps} loss {mean:.4f} "
            + " ".join(parts)
            + f" {rate:,.0f} samples/s {seconds:.0f} s"
        )
        self.log.append(line)
        if self.progress:
            print(line, flush=True)

    # -- at the end
    def finish(self) -> list[float]:
        """Wait for the device, print the last line if not yet printed; every step's loss as floats."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.steps_done > self._logged:
            self._print()
        self.seconds = time.perf_counter() - self.started
        return self.losses[: self.steps_done].tolist()

    def measurements(self) -> dict[str, Any]:
        """Where and why the loop stopped, and how fast it went (for the build record)."""
        seconds = getattr(self, "seconds", time.perf_counter() - self.started)
        return {
            "fast_path": True,
            "precision": "bf16-autocast",
            "steps_done": self.steps_done,
            "stopped_by": self.stopped_by,
            "max_seconds": self.max_seconds,
            "log_every": self.log_every,
            "samples_per_second": round(self.steps_done * self.batch_size / max(seconds, 1e-9), 1),
        }
