"""A checkpoint that cannot be written (disk full, folder not writable) is one line naming the folder and
the space needed, and the run folder stays resumable from the last complete checkpoint (issue 28).

The failure is injected at the write itself (``torch.save`` raising the OSError the kernel gives), the
rest of the run -- models, optimizer, accelerate, the checkpoint folder logic -- is real.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from idcraft.errors import IdcraftError
from idcraft.training import train
from idcraft.training.state import checkpoint_dirs, checkpoint_problem

from .helpers import config


def _fail_saves_from(monkeypatch, step_calls: int, code: int):
    """``torch.save`` works for the first ``step_calls`` calls, then fails as a full disk would: after
    writing part of the file."""
    real = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > step_calls:
            with open(f, "wb") as partial:
                partial.write(b"PK\x03\x04 half a file")
            raise OSError(code, errno.errorcode[code] if code in errno.errorcode else "error", str(f))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_while_checkpointing_is_one_line_and_the_run_resumes(models, data, tmp_path, monkeypatch):
    code, words = errno.ENOSPC, "no space left"
    run = tmp_path / "run"
    # each checkpoint calls torch.save three times (rank state, optimizer, scheduler): step 1 is saved whole
    _fail_saves_from(monkeypatch, 3, code)
    with pytest.raises(IdcraftError) as caught:
        train(config(models, data, run, max_steps=3, checkpoint_every=1))
    message = str(caught.value)
    assert "\n" not in message and words in message
    assert str(run / "checkpoints") in message and "step-00000002" in message
    assert "--resume" in message and "step-00000001" in message
    if code == errno.ENOSPC:
        assert " MB" in message  # the space a checkpoint needs
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000001"]
    assert checkpoint_problem(checkpoint_dirs(run)[0]) is None
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")], "partial folder left"

    monkeypatch.undo()  # space freed: the run continues from step 1
    result = train(config(models, data, run, max_steps=3, checkpoint_every=1, resume=True))
    assert result.step == 3 and len(result.losses) == 2


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (OSError(errno.EACCES, "Permission denied"), "not writable"),
        (OSError(errno.EROFS, "Read-only file system"), "not writable"),
        (OSError(errno.ENOSPC, "No space left on device"), "no space left"),
    ],
)
def test_write_errors_are_named_and_others_kept(tmp_path, error, words):
    from idcraft.training.state import checkpoint_write_error, write_problem

    problem = write_problem(error, tmp_path)
    message = str(checkpoint_write_error(problem, tmp_path, "step-00000007", 3 * 2**20, None))
    assert words in message and str(tmp_path) in message and "step 0" in message
    assert (
        write_problem(OSError(errno.EIO, "I/O error"), tmp_path) is None
    )  # a real fault keeps its traceback
    assert write_problem(ValueError("bug"), tmp_path) is None


def test_a_full_disk_at_the_final_export_keeps_the_weights_and_resume_writes_them(
    models, data, tmp_path, monkeypatch
):
    import idcraft.checkpoints as checkpoints

    run = tmp_path / "run"
    real = checkpoints.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if Path(filename).parent == run:  # the run folder's own adapter, not a checkpoint's
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", save_file)
    with pytest.raises(IdcraftError) as caught:
        train(config(models, data, run, max_steps=2, checkpoint_every=2))
    message = str(caught.value)
    assert "\n" not in message and "has no space left" in message and "--resume" in message
    assert str(run / "checkpoints" / "step-00000002" / "adapter.safetensors") in message
    assert not (run / "adapter.safetensors").exists()

    monkeypatch.undo()
    result = train(config(models, data, run, max_steps=2, checkpoint_every=2, resume=True))
    assert (run / "adapter.safetensors").is_file() and result.step == 2
