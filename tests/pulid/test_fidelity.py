"""Contract: `idcraft generate --method pulid` reproduces the official PuLID v1.1 pipeline.

tests/fixtures/pulid-sdxl was made by running ToTheBeginning/PuLID's pipeline_v1_1.py float32 on CPU with
tiny random weights (see its README.txt), with the raw embedding, aligned face and label map fed in place
of the detectors. Every case must match its expected image within 2/255 per pixel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idcraft.cli import main

CASE = Path(__file__).resolve().parents[1] / "fixtures" / "pulid-sdxl"
ARGS = json.loads((CASE / "args.json").read_text())


def cli_flags(args: dict, *, method: bool = True) -> list[str]:
    flags = ["--method", "pulid"] if method else []
    for key in ("prompt", "negative_prompt", "seed", "steps", "guidance", "scale", "num_zero", "ortho", "sampler",
                "width", "height"):  # fmt: skip
        flags += [f"--{key.replace('_', '-')}", str(args[key])]
    for i in range(args["faces"]):
        flags += ["--face-embedding", str(CASE / f"embedding_{i}.npy")]
        flags += ["--aligned-face", str(CASE / f"aligned_{i}.png")]
        flags += ["--face-parsing", str(CASE / f"parsing_{i}.png")]
    return flags + [
        "--base", str(CASE / "base"), "--adapter", str(CASE / "pulid_tiny.safetensors"),
        "--eva-clip", str(CASE / "eva_tiny.pt"), "--device", "cpu", "--dtype", "float32",
    ]  # fmt: skip


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("name", sorted(ARGS))
def test_generate_reproduces_official(name, tmp_path):
    out = tmp_path / "out.png"
    assert main(["generate", *cli_flags(ARGS[name], method=name != "v2"), "--output", str(out)]) == 0
    ours, expected = read(out), read(CASE / f"expected_{name}.png")
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 2, name
    if name != "scale_0":  # the ID branch really acts: the same settings at ID scale 0 differ clearly
        assert np.abs(ours - read(CASE / "expected_scale_0.png")).mean() > 3
