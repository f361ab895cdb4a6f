"""Progress of a run: a tqdm bar, ``OUTPUT/log.csv`` always, TensorBoard when it is installed.

The CSV is the record that always exists (a run on a headless cluster node has no terminal and maybe no
TensorBoard); a resumed run appends to it after dropping the rows of steps it is about to redo, so the
file reads as one run.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

log = logging.getLogger(__name__)

COLUMNS = ("step", "loss", "lr", "samples_per_s", "elapsed")


class Reporter:
    """Writes one row per logged step; a no-op on non-main processes."""

    def __init__(
        self,
        output: Path,
        *,
        enabled: bool,
        start_step: int,
        total_steps: int,
        progress: bool,
        tensorboard: bool,
    ):
        self.enabled = enabled
        self.bar = None
        self.writer = None
        self.csv_file = None
        if not enabled:
            return
        path = Path(output) / "log.csv"
        rows = []
        if path.is_file() and start_step > 0:
            with path.open(newline="", encoding="utf-8") as f:
                rows = [
                    r
                    for r in csv.DictReader(f)
                    if r.get("step", "").isdigit() and int(r["step"]) <= start_step
                ]
        self.csv_file = path.open("w", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=COLUMNS)
        self.csv.writeheader()
        self.csv.writerows(rows)
        self.csv_file.flush()
        if tensorboard:
            self.writer = _tensorboard_writer(Path(output) / "tensorboard")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def step(
        self, step: int, loss: float, lr: float, samples_per_s: float, elapsed: float, *, log_row: bool
    ) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.2f}", refresh=False
            )
        if log_row:
            self.csv.writerow(
                {
                    "step": step,
                    "loss": f"{loss:.6g}",
                    "lr": f"{lr:.6g}",
                    "samples_per_s": f"{samples_per_s:.4g}",
                    "elapsed": f"{elapsed:.2f}",
                }
            )
            self.csv_file.flush()
            if self.writer is not None:
                self.writer.add_scalar("train/loss", loss, step)
                self.writer.add_scalar("train/lr", lr, step)
                self.writer.add_scalar("train/samples_per_s", samples_per_s, step)

    def image(self, tag: str, image, step: int) -> None:
        if self.writer is not None:
            import numpy as np

            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            log.warning(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.csv_file is not None:
            self.csv_file.close()
        self.bar = self.writer = self.csv_file = None


def _tensorboard_writer(directory: Path):
    """A SummaryWriter if TensorBoard is installed; it is optional, so its absence is not an error."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # ImportError, or tensorboard's own import-time failures
        return None
    return SummaryWriter(log_dir=str(directory))
