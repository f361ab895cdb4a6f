"""What a run leaves behind: official adapter files that idcraft and diffusers load, logs, samples."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from idcraft.checkpoints import load_checkpoint
from idcraft.cli import main
from idcraft.pipeline import IPAdapterPipeline
from idcraft.training import train

from .helpers import config, make_images


@pytest.fixture(scope="module")
def run(models, tmp_path_factory):
    """One short Plus run on SD1.5 writing both formats and sample images."""
    root = tmp_path_factory.mktemp("outputs")
    images = make_images(root / "data", 4)
    cfg = config(
        models,
        root / "data",
        root / "run",
        method="ip-adapter-plus",
        max_steps=4,
        formats=("safetensors", "bin"),
        sample_every=2,
        sample_prompt="a picture",
        sample_reference=str(images[0]),
        sample_steps=2,
        learning_rate=1e-3,
        log_every=1,
    )
    result = train(cfg)
    return root, result


def test_both_official_files_hold_the_same_trained_weights(run):
    root, result = run
    out = root / "run"
    assert sorted(p.name for p in result.files) == ["adapter.bin", "adapter.safetensors"]
    a, b = load_checkpoint(out / "adapter.safetensors"), load_checkpoint(out / "adapter.bin")
    for group in ("image_proj", "ip_adapter"):
        left, right = a.groups()[group], b.groups()[group]
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    assert "latents" in a.image_proj  # a Resampler: Plus
    assert a.metadata.get("method") == "ip-adapter-plus"


def test_adapter_loads_in_idcraft_pipeline_and_cli(run, models, reference_image):
    root, _ = run
    out = root / "run"
    pipe = IPAdapterPipeline.from_pretrained(
        models["sd15"], out / "adapter.safetensors", models["encoder"], device="cpu", dtype="float32"
    )
    assert pipe.adapter.method.name == "ip-adapter-plus"
    image = pipe("a cat", reference_image, steps=2, width=64, height=64, seed=1, progress=False)[0]
    assert image.size == (64, 64)
    code = main(
        [
            "generate",
            "--base",
            str(models["sd15"]),
            "--adapter",
            str(out / "adapter.bin"),
            "--image-encoder",
            str(models["encoder"]),
            "--reference",
            str(root / "data" / "img00.png"),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--device",
            "cpu",
            "--output",
            str(root / "gen.png"),
        ]
    )
    assert code == 0 and (root / "gen.png").is_file()


def test_adapter_loads_in_diffusers_and_matches_idcraft(run, models, reference_image):
    from diffusers import StableDiffusionPipeline

    root, _ = run
    out = root / "run"
    ours = IPAdapterPipeline.from_pretrained(
        models["sd15"], out / "adapter.safetensors", models["encoder"], device="cpu", dtype="float32"
    )
    mine = ours(
        "a red ball", reference_image, steps=2, guidance=5.0, width=64, height=64, seed=11, progress=False
    )[0]

    pipe = StableDiffusionPipeline.from_pretrained(
        models["sd15"], safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        str(out), subfolder="", weight_name="adapter.safetensors", image_encoder_folder=str(models["encoder"])
    )
    theirs = pipe(
        "a red ball",
        ip_adapter_image=reference_image,
        num_inference_steps=2,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images[0]
    diff = np.abs(np.asarray(mine, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
    assert diff.max() <= 2, diff.max()


def test_log_samples_and_skip_report(run):
    root, result = run
    out = root / "run"
    with (out / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"step", "loss", "lr", "samples_per_s", "elapsed"}
    assert all(float(r["loss"]) > 0 and float(r["samples_per_s"]) > 0 for r in rows)
    assert float(rows[0]["lr"]) == pytest.approx(1e-3)
    assert [float(r["loss"]) for r in rows] == pytest.approx(result.losses, rel=1e-5)
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step-00000002-0.png",
        "step-00000004-0.png",
    ]
    assert (out / "skipped.txt").read_text() == ""
    assert (out / "config.json").is_file()


def test_sampling_does_not_disturb_training(run, models):
    """Previews build a copy of the adapter and generate with it: the trained weights end the same."""
    root, _ = run
    cfg = config(
        models, root / "data", root / "plain", method="ip-adapter-plus", max_steps=4, learning_rate=1e-3
    )
    train(cfg)
    a, b = (
        load_checkpoint(root / "run" / "adapter.safetensors"),
        load_checkpoint(root / "plain" / "adapter.safetensors"),
    )
    for group in ("image_proj", "ip_adapter"):
        assert all(torch.equal(a.groups()[group][k], b.groups()[group][k]) for k in a.groups()[group])


def test_reporter_writes_csv_and_tensorboard_when_available(tmp_path, monkeypatch):
    """TensorBoard is optional: without it nothing breaks; with it, the same numbers go there too."""
    from PIL import Image

    from idcraft.training import reporting

    calls = []

    class Writer:
        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

        def add_image(self, tag, image, step, dataformats):
            calls.append((tag, step, image.shape, dataformats))

        def close(self):
            calls.append("closed")

    monkeypatch.setattr(reporting, "_tensorboard_writer", lambda folder: Writer())
    reporter = reporting.Reporter(
        tmp_path, enabled=True, start_step=0, total_steps=3, progress=False, tensorboard=True
    )
    for step in (1, 2, 3):
        reporter.step(step, 1.0 / step, 1e-4, 10.0, step * 0.5, log_row=step != 2)
    reporter.image("samples/0", Image.new("RGB", (8, 6)), 3)
    reporter.close()
    assert ("train/loss", 1) in calls and ("train/loss", 2) not in calls and calls[-1] == "closed"
    assert ("samples/0", 3, (6, 8, 3), "HWC") in calls

    # a resumed run keeps the rows up to its checkpoint and rewrites the rest
    resumed = reporting.Reporter(
        tmp_path, enabled=True, start_step=1, total_steps=3, progress=False, tensorboard=False
    )
    resumed.step(2, 0.7, 1e-4, 10.0, 1.0, log_row=True)
    resumed.close()
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows] == [["step", "loss"], ["1", "1"], ["2", "0.7"]]
    writer = reporting._tensorboard_writer(tmp_path / "tb")  # None where TensorBoard is missing; never raises
    if writer is not None:
        writer.close()
