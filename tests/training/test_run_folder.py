"""Run folders are never lost: a finished run is not overwritten unasked, two runs cannot write one folder,
``--resume`` continues only the same run and passes over a corrupt newest checkpoint (issue 21)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from idcraft.errors import IdcraftError
from idcraft.training import train
from idcraft.training.state import LOCK_NAME, checkpoint_dirs, checkpoint_problem, run_lock

from .helpers import config, make_images


@pytest.fixture(scope="module")
def finished(models, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copied by tests that change it)."""
    root = tmp_path_factory.mktemp("finished")
    make_images(root / "data", 4)
    train(config(models, root / "data", root / "run", max_steps=4, checkpoint_every=2, seed=1))
    return root


def _copy(finished, tmp_path):
    shutil.copytree(finished / "data", tmp_path / "data")
    shutil.copytree(finished / "run", tmp_path / "run")
    # the copy must name the copied data, as a run started there would
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    for folder in checkpoint_dirs(tmp_path / "run"):
        state = json.loads((folder / "state.json").read_text())
        state["config"]["data"] = str(tmp_path / "data")
        (folder / "state.json").write_text(json.dumps(state))
    cfg["data"] = str(tmp_path / "data")
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "data", tmp_path / "run"


def test_a_finished_run_is_never_silently_overwritten(models, finished, tmp_path):
    data, run = _copy(finished, tmp_path)
    adapter = (run / "adapter.safetensors").read_bytes()
    with pytest.raises(IdcraftError, match="--resume.*--overwrite"):
        train(config(models, data, run, max_steps=2))
    shutil.rmtree(run / "checkpoints")  # checkpoints cleaned up by hand: the adapter is still the result
    with pytest.raises(IdcraftError, match=r"finished run \(adapter.safetensors\).*--overwrite"):
        train(config(models, data, run, max_steps=2))
    with pytest.raises(IdcraftError, match="finished run.*no checkpoint"):
        train(config(models, data, run, max_steps=2, resume=True))
    assert (run / "adapter.safetensors").read_bytes() == adapter
    assert not (run / LOCK_NAME).exists()  # released after a refusal too

    result = train(config(models, data, run, max_steps=2, overwrite=True))
    assert result.step == 2 and [p.name for p in checkpoint_dirs(run)] == ["step-00000002"]
    assert (run / "adapter.safetensors").read_bytes() != adapter
    with pytest.raises(IdcraftError, match="give only one"):
        train(config(models, data, run, max_steps=2, overwrite=True, resume=True))


def test_a_second_run_into_the_same_folder_fails_at_once(models, data, tmp_path):
    out = tmp_path / "run"
    with run_lock(out):
        holder = (out / LOCK_NAME).read_text().strip()
        assert holder.isdigit()
        with pytest.raises(IdcraftError, match=rf"in use by another training run \(pid {holder}\)"):
            train(config(models, data, out, max_steps=1))
    assert not out.exists()  # the lock's own folder is removed when nothing was written
    assert train(config(models, data, out, max_steps=1)).step == 1
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(method="ip-adapter-plus"), r"--method ip-adapter"),
        (dict(base="sdxl"), r"--base"),
        ("other data", r"--data"),
        ("edited data", r"--data .* changed since the run started"),
    ],
)
def test_resume_refuses_another_model_method_or_dataset(models, finished, tmp_path, change, message):
    data, run = _copy(finished, tmp_path)
    overrides = dict(max_steps=6, checkpoint_every=2, seed=1, resume=True)
    if change == "other data":
        data = tmp_path / "other"
        make_images(data, 4, seed=9)
        (data / "img03.txt").write_text("a longer caption than before\n")
    elif change == "edited data":
        (data / "img01.txt").write_text("a different caption\n")
    else:
        overrides.update(change)
    with pytest.raises(IdcraftError, match=message) as caught:
        train(config(models, data, run, **overrides))
    assert "cannot resume" in str(caught.value)


def test_resume_says_where_it_starts_and_passes_over_a_corrupt_checkpoint(models, finished, tmp_path, caplog):
    data, run = _copy(finished, tmp_path)
    newest = run / "checkpoints" / "step-00000004" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    assert "trainable.safetensors" in checkpoint_problem(newest.parent)
    assert checkpoint_problem(run / "checkpoints" / "step-00000002") is None

    with caplog.at_level(logging.WARNING, logger="idcraft.training.loop"):
        result = train(config(models, data, run, max_steps=4, checkpoint_every=2, seed=1, resume=True))
    said = caplog.text
    assert "step-00000004 is corrupt or truncated" in said
    assert "continuing from step 2" in said
    assert result.resumed_from.name == "step-00000002" and result.step == 4 and len(result.losses) == 2
    assert checkpoint_problem(run / "checkpoints" / "step-00000004") is None  # rewritten whole


def test_moved_data_with_the_same_content_resumes(models, finished, tmp_path):
    data, run = _copy(finished, tmp_path)
    moved = tmp_path / "moved"
    data.rename(moved)
    result = train(config(models, moved, run, max_steps=5, checkpoint_every=2, seed=1, resume=True))
    assert result.step == 5


def test_cli_overwrite_flag(models, finished, tmp_path, capsys):
    from idcraft.cli import main

    data, run = _copy(finished, tmp_path)
    args = ["train", "--method", "ip-adapter", "--base", str(models["sd15"])]
    args += ["--image-encoder", str(models["encoder"]), "--data", str(data), "--output", str(run)]
    args += ["--resolution", "32", "--batch-size", "2", "--max-steps", "1", "--no-progress", "--seed", "1"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((run / "config.json").read_text())["max_steps"] == 1
