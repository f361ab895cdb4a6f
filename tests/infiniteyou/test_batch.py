"""``idcraft batch`` with an infiniteyou model from a models config (``model_version`` picking the folder
under the release's parent): the job's image is the official one."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from idcraft.cli import main

from .conftest import CASE


def test_batch_job_reproduces_official(case_args, tmp_path):
    args = case_args["scale_window"]
    config = {
        "device": "cpu",
        "dtype": "float32",
        "models": {
            "iyou": {
                "method": "infiniteyou",
                "base": str(CASE / "base"),
                "adapter": str(CASE / "release"),
                "model_version": "aes_stage2",
            }
        },
    }
    (tmp_path / "models.json").write_text(json.dumps(config))
    job = {
        "id": "one",
        "model": "iyou",
        "prompt": args["prompt"],
        "face_embeddings": [str(CASE / "embedding.npy")],
        "keypoints": json.loads((CASE / "keypoints.json").read_text()),
        "seed": args["seed"],
        "steps": args["steps"],
        "width": args["width"],
        "height": args["height"],
        "guidance": args["guidance"],
        "scale": args["infusenet_scale"],
        "infusenet_start": args["infusenet_start"],
        "infusenet_end": args["infusenet_end"],
    }
    (tmp_path / "jobs.jsonl").write_text(json.dumps(job) + "\n")
    out = tmp_path / "out"
    argv = ["batch", "--requests", str(tmp_path / "jobs.jsonl"), "--config", str(tmp_path / "models.json")]
    assert main([*argv, "--output", str(out)]) == 0
    ours = np.asarray(Image.open(out / "images" / "one.png").convert("RGB"), dtype=np.int16)
    expected = np.asarray(Image.open(CASE / "scale_window.png").convert("RGB"), dtype=np.int16)
    assert np.abs(ours - expected).max() <= 2
