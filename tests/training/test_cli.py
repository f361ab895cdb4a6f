"""`idcraft train` end to end, settings files, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from idcraft.cli import main
from idcraft.training import TrainConfig


def _args(models, data, output, *extra: str) -> list[str]:
    return [
        "train",
        "--method",
        "ip-adapter",
        "--base",
        str(models["sd15"]),
        "--image-encoder",
        str(models["encoder"]),
        "--data",
        str(data),
        "--output",
        str(output),
        "--resolution",
        "32",
        "--batch-size",
        "2",
        "--no-progress",
        *extra,
    ]


def test_train_command_end_to_end_with_config_file_and_resume(models, data, tmp_path, capsys):
    settings = tmp_path / "train.yaml"
    settings.write_text("learning-rate: 0.002\ncheckpoint_every: 2\ntensorboard: false\nseed: 9\n")
    out = tmp_path / "run"
    assert (
        main(_args(models, data, out, "--config", str(settings), "--max-steps", "2", "--format", "bin")) == 0
    )
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "adapter.safetensors"), str(out / "adapter.bin")]
    saved = json.loads((out / "config.json").read_text())
    assert saved["learning_rate"] == 0.002 and saved["seed"] == 9 and saved["max_steps"] == 2  # file < flags
    assert (out / "log.csv").read_text().count("\n") == 3

    assert main(_args(models, data, out, "--config", str(settings), "--max-steps", "3", "--resume")) == 0
    assert json.loads((out / "checkpoints" / "step-00000003" / "state.json").read_text())["step"] == 3

    # the generated adapter runs through `idcraft generate`
    code = main(
        [
            "generate",
            "--base",
            str(models["sd15"]),
            "--adapter",
            str(out / "adapter.safetensors"),
            "--image-encoder",
            str(models["encoder"]),
            "--reference",
            str(data / "img00.png"),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--width",
            "32",
            "--height",
            "32",
            "--device",
            "cpu",
            "--output",
            str(tmp_path / "x.png"),
        ]
    )
    assert code == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(2, "faceid-nope"), r"training is not available for method 'faceid-nope'"),
        (lambda a: a.__setitem__(a.index("--image-encoder") + 1, "/no/such/encoder"), r"no such directory"),
        (lambda a: a.__setitem__(a.index("--data") + 1, "/no/data/here"), r"no such folder or manifest"),
        (lambda a: a.extend(["--batch-size", "0"]), r"batch_size must be at least 1"),
        (lambda a: a.extend(["--batch-size", "9"]), r"fewer than one global batch"),
        (lambda a: a.extend(["--sample-every", "1"]), r"--sample-every needs --sample-reference"),
    ],
)
def test_bad_input_gives_a_clear_error(models, data, tmp_path, capsys, change, message):
    import re

    args = _args(models, data, tmp_path / "run", "--max-steps", "1")
    change(args)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_config_file_errors(tmp_path):
    from idcraft.errors import IdcraftError

    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"method": "ip-adapter", "base": "b", "data": "d", "output": "o", "learning_rat": 1})
    )
    with pytest.raises(IdcraftError, match="unknown setting.*learning_rat"):
        TrainConfig.from_sources(bad)
    ok = tmp_path / "ok.json"
    ok.write_text(
        json.dumps(
            {"method": "ip-adapter", "base": "b", "data": "d", "output": "o", "adam-betas": [0.8, 0.9]}
        )
    )
    cfg = TrainConfig.from_sources(ok, seed=3, output="elsewhere", batch_size=None)
    assert (
        cfg.adam_betas == (0.8, 0.9) and cfg.seed == 3 and cfg.output == "elsewhere" and cfg.batch_size == 8
    )
    with pytest.raises(IdcraftError, match="missing required setting.*base"):
        TrainConfig.from_mapping({"method": "ip-adapter", "data": "d", "output": "o"})
    with pytest.raises(IdcraftError, match="drop rates"):
        TrainConfig(method="ip-adapter", base="b", data="d", output="o", drop_image=0.6, drop_text=0.6)


def test_help_lists_exactly_the_trainable_methods():
    from idcraft.cli.train import TRAINABLE
    from idcraft.training import RECIPES

    assert set(TRAINABLE) == set(RECIPES)
