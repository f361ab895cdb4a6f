"""A run killed mid-way and resumed ends bit-identical to one that never stopped (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from idcraft.errors import IdcraftError
from idcraft.training import train
from idcraft.training.state import checkpoint_dirs

from .helpers import Killed, config, kill_at, make_images


def _adapter(folder):
    return load_file(str(folder / "adapter.safetensors"))


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture
def odd_data(tmp_path):
    # 5 samples, batch 2: 2 steps per epoch with one sample left over, so the run crosses epochs mid-way
    # and the order changes per epoch; accumulation 2 makes epoch ends fall inside optimizer steps.
    folder = tmp_path / "data"
    make_images(folder, 5)
    return folder


@pytest.mark.parametrize("method", ["ip-adapter-plus"])
def test_killed_and_resumed_equals_uninterrupted(models, odd_data, tmp_path, method):
    common = dict(
        method=method,
        max_steps=6,
        checkpoint_every=2,
        gradient_accumulation=2,
        seed=3,
        drop_image=0.3,
        drop_text=0.3,
        drop_both=0.2,
        learning_rate=1e-3,
        noise_offset=0.05,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
    )
    whole = train(config(models, odd_data, tmp_path / "whole", **common))

    run = tmp_path / "killed"
    with pytest.raises(Killed):
        train(config(models, odd_data, run, **common), callbacks=[kill_at(5)])
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000002", "step-00000004"]
    assert not (run / "adapter.safetensors").exists()
    resumed = train(config(models, odd_data, run, resume=True, **common))

    assert resumed.resumed_from.name == "step-00000004" and resumed.step == 6
    _assert_identical(_adapter(tmp_path / "whole"), _adapter(run))
    assert resumed.losses == whole.losses[4:]  # the same steps, the same numbers
    rows = (run / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == [
        "step",
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
    ]  # killed step 5 redone once


def test_max_steps_then_resume_longer_equals_one_long_run(models, data, tmp_path):
    common = dict(checkpoint_every=1000, seed=5, learning_rate=1e-3)
    train(config(models, data, tmp_path / "long", max_steps=5, **common))
    short = train(config(models, data, tmp_path / "short", max_steps=3, **common))
    assert short.step == 3 and [p.name for p in checkpoint_dirs(tmp_path / "short")] == ["step-00000003"]
    more = train(config(models, data, tmp_path / "short", max_steps=5, resume=True, **common))
    assert more.step == 5 and len(more.losses) == 2
    _assert_identical(_adapter(tmp_path / "long"), _adapter(tmp_path / "short"))


def test_checkpoints_are_complete_rotated_and_guarded(models, data, tmp_path):
    run = tmp_path / "run"
    train(config(models, data, run, max_steps=4, checkpoint_every=1, keep_checkpoints=2))
    kept = checkpoint_dirs(run)
    assert [p.name for p in kept] == ["step-00000003", "step-00000004"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")], (
        "temporary folders left"
    )
    files = {p.name for p in kept[-1].iterdir()}
    assert {
        "trainable.safetensors",
        "adapter.safetensors",
        "optimizer.pt",
        "lr_scheduler.pt",
        "rank-0.pt",
        "state.json",
    } <= files
    state = json.loads((kept[-1] / "state.json").read_text())
    assert state["step"] == 4 and state["world"] == 1 and state["config"]["resolution"] == 32
    rank = torch.load(kept[-1] / "rank-0.pt", weights_only=True)
    assert {"rng", "generator", "position", "bad"} <= set(rank)

    with pytest.raises(IdcraftError, match="--resume"):  # a fresh run must not mix with an old one
        train(config(models, data, run, max_steps=4))
    with pytest.raises(IdcraftError, match="batch_size"):  # nor may a resume change the computation
        train(config(models, data, run, max_steps=6, batch_size=1, resume=True))
