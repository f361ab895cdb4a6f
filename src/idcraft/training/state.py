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

import contextlib
import errno
import json
import os
import random
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator
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


def checkpoint_problem(folder: Path) -> str | None:
    """Why checkpoint ``folder`` cannot be resumed from (``None``: it looks complete). Cheap checks that
    catch a truncated or half-copied checkpoint before any model is loaded: ``state.json`` parses and
    names this step, the weights file's safetensors header matches its size, and every ``.pt`` file is a
    complete zip archive (torch's format; the central directory at its end is gone when truncated)."""
    folder = Path(folder)
    try:
        state = read_json(folder / "state.json")
        step = int(state["step"])
        world = int(state.get("world", 1))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"state.json unreadable ({type(exc).__name__}: {exc})"
    match = _NAME.match(folder.name)
    if match and int(match.group(1)) != step:
        return f"state.json says step {step}"
    weights = folder / "trainable.safetensors"
    if not weights.is_file():
        return "trainable.safetensors missing"
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt", device="cpu") as f:
            f.keys()
    except Exception as exc:  # SafetensorError, OSError: truncated or not safetensors
        return f"trainable.safetensors unreadable ({exc})"
    if state.get("backend", "ddp") == "ddp" and not (folder / "optimizer.pt").is_file():
        return "optimizer.pt missing"
    names = ["lr_scheduler.pt", *(f"rank-{r}.pt" for r in range(world))]
    for name in names:
        if not (folder / name).is_file():
            return f"{name} missing"
    for file in sorted(folder.glob("*.pt")):
        try:
            with zipfile.ZipFile(file) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            return f"{file.name} truncated or corrupt ({exc})"
    return None


# ---------------------------------------------------------------------------- the run folder's lock
LOCK_NAME = ".idcraft-train.lock"


@contextlib.contextmanager
def run_lock(output: Path, *, enabled: bool = True) -> Iterator[Path]:
    """Hold ``OUTPUT/.idcraft-train.lock`` (an exclusive ``flock``, the holder's pid inside) while a run
    writes ``output``; a second run into the same folder fails at once, naming the holder. Created folders
    that end up empty are removed again. Where ``fcntl`` is missing (Windows) no lock is taken."""
    from ..errors import IdcraftError

    output = Path(output)
    if not enabled:
        yield output
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield output
        return
    created = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdcraftError(
            f"--output {output}: cannot create the run folder ({exc.strerror or exc})."
        ) from exc
    path = output / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise IdcraftError(
                f"--output {output}: cannot write in the run folder ({exc.strerror or exc})."
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise IdcraftError(
                f"--output {output} is in use by another training run (pid {holder}); wait for it to end, "
                "or choose another --output."
            ) from None
        try:  # the file may have been removed by the previous holder between our open and lock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield output
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held, so nobody locks a file that is about to vanish
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                output.rmdir()  # only succeeds when the run wrote nothing


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
    size_hint: int = 0,
) -> Path:
    """Write checkpoint ``step`` atomically from all processes; returns its folder. ``write_all`` runs on
    every process (sharded optimizer states), ``write_main`` on the main one, last (it writes state.json).

    A full disk or a folder that cannot be written is one :class:`~idcraft.errors.IdcraftError` naming the
    folder and the space a checkpoint needs (``size_hint``, the previous checkpoint's size or what was
    written, the largest); the partial folder is removed, so the run resumes from the last complete one."""
    root = checkpoint_root(output)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    try:
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
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        problem = write_problem(exc, root)
        if problem is None:
            raise
        needed = max(size_hint, _folder_bytes(tmp), _folder_bytes(latest_checkpoint(output)))
        shutil.rmtree(tmp, ignore_errors=True)  # the partial folder: the last complete one stays the latest
        raise checkpoint_write_error(problem, root, final.name, needed, latest_checkpoint(output)) from exc
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


#: errno values that mean "no room": the disk (ENOSPC) or the user's quota (EDQUOT).
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
#: errno values that mean "not allowed to write here".
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_problem(exc: BaseException, folder: Path) -> str | None:
    """``"full"``, ``"denied"`` or ``None`` (another failure, kept as it is) for an error raised while
    writing into ``folder``. torch.save's writer gives a RuntimeError without an errno; a disk with
    (almost) nothing free tells that case apart."""
    code = getattr(exc, "errno", None)
    if code in _FULL:
        return "full"
    if code in _DENIED:
        return "denied"
    if isinstance(exc, RuntimeError) and "write" in str(exc).lower():
        free = _free_bytes(folder)
        if free is not None and free < 64 * 2**20:
            return "full"
    return None


def checkpoint_write_error(problem: str, root: Path, name: str, needed: int, previous: Path | None):
    """The one-line error for a checkpoint that could not be written (see :func:`write_problem`)."""
    from ..errors import IdcraftError

    resume = (
        f"then rerun with --resume: the run continues from {previous.name}, the last complete checkpoint"
        if previous is not None
        else "then rerun: no checkpoint was complete yet, so the run starts again from step 0"
    )
    if problem == "denied":
        return IdcraftError(
            f"cannot save checkpoint {name}: {root} is not writable (permission denied or a read-only disk). "
            f"Make it writable or choose another --output, {resume}."
        )
    free = _free_bytes(root)
    free_text = f", {_mb(free)} free" if free is not None else ""
    return IdcraftError(
        f"cannot save checkpoint {name}: no space left on the disk of {root} (a checkpoint needs about "
        f"{_mb(needed)}{free_text}). Free some space (or lower --keep-checkpoints), {resume}."
    )


def export_write_error(problem: str, output: Path, latest: Path | None):
    """The one-line error for the final adapter that could not be written into ``output``; the newest
    checkpoint holds the same weights (its ``adapter.safetensors``)."""
    from ..errors import IdcraftError

    cause = (
        "is not writable (permission denied or a read-only disk)"
        if problem == "denied"
        else f"has no space left ({_mb(_free_bytes(output) or 0)} free)"
    )
    kept = (
        f"the trained weights are safe in {latest / 'adapter.safetensors'}"
        if latest is not None
        else "no checkpoint holds the weights"
    )
    return IdcraftError(
        f"cannot write the trained adapter: {output} {cause}; {kept}. Free space or fix the folder, then "
        "rerun the same command with --resume to write it."
    )


def _free_bytes(folder: Path) -> int | None:
    for candidate in (Path(folder), *Path(folder).parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _folder_bytes(folder: Path | None) -> int:
    if folder is None or not Path(folder).is_dir():
        return 0
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _mb(size: int) -> str:
    return f"{size / 2**20:,.1f} MB" if size < 2**30 else f"{size / 2**30:,.2f} GB"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_tensors(path: Path) -> dict:
    from ..checkpoints import load_torch_file

    return load_torch_file(path)
