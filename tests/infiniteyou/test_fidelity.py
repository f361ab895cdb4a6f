"""Contract: idcraft reproduces the official InfiniteYou pipeline (tests/fixtures/infiniteyou, made with
bytedance/InfiniteYou's own FluxInfuseNetPipeline in float32 on CPU) within 2/255 per pixel: with and
without a control image, another InfuseNet scale and guidance window, true CFG; through the command line
and the engine."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from idcraft.cli import main

from .conftest import CASE, request_for

CASES = ["control", "no_control", "scale_window", "true_cfg"]


def _expected(name: str) -> np.ndarray:
    return np.asarray(Image.open(CASE / f"{name}.png").convert("RGB"), dtype=np.int16)


def _flags(args: dict) -> list[str]:
    flags = [
        "--method", "infiniteyou", "--base", str(CASE / "base"), "--adapter", str(CASE / "release"),
        "--face-embedding", str(CASE / "embedding.npy"), "--prompt", args["prompt"],
        "--seed", str(args["seed"]), "--steps", str(args["steps"]), "--width", str(args["width"]),
        "--height", str(args["height"]), "--guidance", str(args["guidance"]),
        "--infusenet-scale", str(args["infusenet_scale"]), "--infusenet-start", str(args["infusenet_start"]),
        "--infusenet-end", str(args["infusenet_end"]), "--device", "cpu", "--dtype", "float32",
    ]  # fmt: skip
    if args["keypoints"]:
        flags += ["--keypoints", str(CASE / "keypoints.json")]
    if args.get("negative_prompt"):
        flags += ["--negative-prompt", args["negative_prompt"], "--true-cfg", str(args["true_cfg"])]
    return flags


@pytest.mark.parametrize("name", ["scale_window"])
def test_cli_reproduces_official(name, case_args, tmp_path):
    out = tmp_path / "out.png"
    assert main(["generate", *_flags(case_args[name]), "--output", str(out)]) == 0
    ours = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert ours.shape == _expected(name).shape
    assert np.abs(ours - _expected(name)).max() <= 2


@pytest.mark.parametrize("name", CASES)
def test_engine_reproduces_official(name, case_args, iyou_engine):
    image = iyou_engine.generate(request_for(case_args[name])).images[0]
    ours = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert np.abs(ours - _expected(name)).max() <= 2


def test_the_cases_differ_where_they_should(case_args, iyou_engine):
    """InfuseNet really acts: scale 0 differs from every case, and the control image changes the output."""
    off = iyou_engine.generate(request_for(case_args["control"], scale=0.0)).images[0]
    off = np.asarray(off.convert("RGB"), dtype=np.int16)
    for name in CASES:
        assert np.abs(off - _expected(name)).mean() > 2, name
    assert np.abs(_expected("control") - _expected("no_control")).max() > 30
