"""Files idcraft writes get the permissions a plain ``open()`` gives (0o666 less the umask), as users and
shared folders expect, not the private 0600 of the temporary file they are written through."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from idcraft import outputs
from idcraft.checkpoints import AdapterCheckpoint, save_checkpoint
from idcraft.outputs import atomic_save_image, atomic_save_npy, atomic_write_text, save_safetensors

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


@pytest.fixture
def umask():
    """Set the process umask for the test; the previous one is put back."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _write_everything(folder):
    image = Image.new("RGB", (8, 8), (200, 10, 10))
    checkpoint = AdapterCheckpoint({"proj.weight": torch.zeros(2, 2)}, {"1.to_k_ip.weight": torch.ones(2, 2)})
    return [
        atomic_save_image(image, folder / "image.png"),
        atomic_save_image(image, folder / "image.jpg"),
        atomic_save_npy(np.zeros(4, np.float32), folder / "embedding.npy"),
        atomic_write_text(folder / "note.json", "{}\n"),
        save_checkpoint(checkpoint, folder / "adapter.safetensors"),
        save_checkpoint(checkpoint, folder / "adapter.bin"),
        save_safetensors({"w": torch.ones(3)}, folder / "weights.safetensors"),  # plain save_file: 0600
    ]


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    for path in _write_everything(tmp_path):
        assert _mode(path) == expected, path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["image.png", "image.jpg", "embedding.npy", "note.json", "adapter.safetensors", "adapter.bin"]
        + ["weights.safetensors"]
    )  # no temporary file left behind


def test_replacing_a_file_takes_the_new_mode(tmp_path, umask):
    umask(0o077)
    atomic_write_text(tmp_path / "note.txt", "old")
    assert _mode(tmp_path / "note.txt") == 0o600
    umask(0o022)
    atomic_write_text(tmp_path / "note.txt", "new")
    assert _mode(tmp_path / "note.txt") == 0o644 and (tmp_path / "note.txt").read_text() == "new"


def test_umask_is_read_where_proc_is_missing(tmp_path, umask, monkeypatch):
    umask(0o027)
    assert outputs.current_umask() == 0o027

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/status")

    monkeypatch.setattr(outputs, "open", no_proc, raising=False)  # the module's open(): as on macOS
    assert outputs.current_umask() == 0o027
    assert os.umask(0o027) == 0o027  # and left as it was
    atomic_write_text(tmp_path / "note.txt", "x")
    assert _mode(tmp_path / "note.txt") == 0o640
