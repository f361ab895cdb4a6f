"""Training checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint is a folder ``OUTPUT/checkpoints/step-00001000/`` holding

* ``trainable.safetensors``: the trainable tensors, exact dtypes (what resume loads);
* ``adapter.safetensors``: the same weights in the official layout (usable with ``idcraft generate``);
* ``optimizer.pt``, ``lr_scheduler.pt`` (and ``grad_scaler.pt`` under fp16): their ``state_dict()``s;
  under FSDP the optimizer is accelerate's FSDP optimizer checkpoint instead (``optimizer_0/``, one shard
  per process, or ``optimizer.bin``), under DeepSpeed the engine's checkpoint ``deepspeed/`` (its
  partitioned optimizer state; frozen parameters excluded), both written by every process;
* ``rank-<r>.pt`` per process: the Python, NumPy, torch (and CUDA) RNG states, the training generator
  (noise, timesteps, drops) and the data position ``(epoch, step, cursor)`` plus samples found bad;
* ``state.json`` (written last): global step, samples seen, elapsed time, world size and the config.

Own files rather than ``accelerator.save_state``: that would also save the frozen base model with the
prepared module (gigabytes per checkpoint) and not the training generator or data cursor. Everything
here loads with ``torch.load(weights_only=True)`` (DeepSpeed's own files load the DeepSpeed way).

The folder is written as ``.tmp-step-...`` and renamed when complete, so a run killed while saving
leaves the previous checkpoint as the latest; only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8,})$")


def checkpoint_root(output: Path) -> Path:
    return Path(output) / CHECKPOINTS


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _NAME.match(p.name)) and (p / "state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output: Path) -> Path | None:
    dirs = checkpoint_dirs(output)
    return dirs[-1] if dirs else None


# ---------------------------------------------------------------------------- RNG
def capture_rng() -> dict:
    """Global RNG states as plain tensors/lists (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    legacy = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [legacy[0], torch.from_numpy(legacy[1].astype(np.int64)), legacy[2], legacy[3], legacy[4]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_generator(seed: int, rank: int) -> torch.Generator:
    """The CPU generator all of a process's training randomness comes from (distinct per process)."""
    value = int(np.random.SeedSequence([seed, rank, 0x1DC4AF7]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(value)


# ---------------------------------------------------------------------------- save / load
def save(
    accelerator,
    output: Path,
    step: int,
    *,
    write_main: Callable[[Path], None],
    rank_state: dict,
    keep: int,
    write_all: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically from all processes; returns its folder. ``write_all`` runs on
    every process (sharded optimizer states), ``write_main`` on the main one, last (it writes state.json)."""
    root = checkpoint_root(output)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if write_all is not None:
        write_all(tmp)
        accelerator.wait_for_everyone()
    torch.save(rank_state, tmp / f"rank-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        write_main(tmp)  # writes state.json last
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            old = root / f".old-step-{step:08d}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        for stale in checkpoint_dirs(output)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_tensors(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
