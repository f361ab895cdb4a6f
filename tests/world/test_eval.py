"""Generation in the world, ``idcraft eval`` and ``idcraft demo``, end to end on a fake tiny bundle
(random weights in the bundle layout; see conftest.py). The numbers mean nothing here; the plumbing,
the files and the pairing of requests across methods are what is checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from idcraft.cli import main
from idcraft.errors import IdcraftError
from idcraft.world.evaluate import eval_requests, format_table, plot
from idcraft.world.generate import METHODS, Request, WorldGenerator, available_methods, reference_image
from idcraft.world.identity import held_out_ids
from idcraft.world.render import render
from idcraft.world.scene import Scene

SCENES = [Scene("beach", "left", "small", "jumping", 1), Scene("snow", "right", "large", "tilt_left", 2)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread gains nothing, and on a busy machine OpenMP's spinning
    threads make every small op many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def generator(fake_bundle):
    return WorldGenerator(fake_bundle, device="cpu")


def test_every_method_makes_images_and_seeds_pair_them(generator):
    ids = held_out_ids()[:2]
    requests = [Request(i, s, 7 + k) for k, (i, s) in enumerate(zip(ids, SCENES, strict=True))]
    outputs = {m: generator.generate(m, requests, steps=2, scale=0.5, batch_size=2) for m in METHODS}
    for method, images in outputs.items():
        assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8, method
    # the noise depends on the request, not on the batch it is in
    alone = generator.generate("ip-adapter", requests[1:], steps=2, scale=0.5)
    assert np.abs(alone[0].astype(int) - outputs["ip-adapter"][1]).max() <= 2
    # adapters change the image (scale matters), and differ from each other and from the text baselines
    zero = generator.generate("ip-adapter-plus", requests, steps=2, scale=0.0)
    assert np.abs(zero.astype(int) - outputs["ip-adapter-plus"]).mean() > 1
    assert np.abs(outputs["faceid"].astype(int) - outputs["text-coarse"]).mean() > 1
    assert np.abs(outputs["text-scene"].astype(int) - outputs["text-coarse"]).mean() > 0
    # baselines without a model: the reference itself, and the world's render of the requested scene
    assert (outputs["copy"][0] == np.asarray(reference_image(ids[0]))).all()
    assert (outputs["render"][1] == np.asarray(render(requests[1].identity, SCENES[1]).image)).all()
    # the latent ceiling: that render through the base model's own VAE
    import torch

    vae = generator.base.vae
    with torch.no_grad():
        pixels = torch.from_numpy(outputs["render"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    expected = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(outputs["vae"].astype(int) - expected).max() <= 1
    assert np.abs(outputs["vae"].astype(int) - outputs["render"]).mean() > 1  # a random VAE changes it


def test_instantid_keypoints_come_from_the_scene_or_the_reference(generator):
    request = [Request(held_out_ids()[0], SCENES[0], 3)]
    scene = generator.generate("instantid", request, steps=2, instantid_keypoints="scene")
    ref = generator.generate("instantid", request, steps=2, instantid_keypoints="reference")
    assert np.abs(scene.astype(int) - ref).max() > 0  # IdentityNet sees where the face goes
    tokens = generator.tokens("instantid", request[0].identity_id)
    drawn = {m: np.asarray(generator._keypoint_image(request[0], tokens, m)) for m in ("scene", "reference")}
    lit = {m: np.argwhere(image.any(axis=2)).mean(axis=0) for m, image in drawn.items()}  # (row, col) centre
    assert lit["scene"][1] < 32 and abs(lit["reference"][1] - 32) < 4  # the scene puts the face on the left
    with pytest.raises(IdcraftError, match="instantid_keypoints"):
        generator.generate("instantid", request, steps=2, instantid_keypoints="nowhere")


def test_bad_arguments_and_missing_bundle(tmp_path, generator):
    with pytest.raises(IdcraftError, match="unknown world method"):
        generator.generate("dreambooth", [], steps=2)
    with pytest.raises(IdcraftError, match="not in the world bundle"):
        WorldGenerator(tmp_path / "no-bundle")


def test_available_methods_follow_the_bundle_files(fake_bundle, tmp_path):
    assert available_methods(fake_bundle) == ("ip-adapter", "ip-adapter-plus", "faceid", "instantid")
    assert available_methods(tmp_path) == ()


def test_eval_requests_are_fixed_by_the_seed():
    a, b, c = (
        eval_requests([5, 9], 3, seed=0),
        eval_requests([5, 9], 3, seed=0),
        eval_requests([5, 9], 3, seed=1),
    )
    assert a == b and a != c
    assert [r.identity_id for r in a] == [5, 5, 5, 9, 9, 9]
    assert len({r.seed for r in a}) == 6


def test_cli_eval_writes_table_json_and_plots(fake_bundle, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--bundle", str(fake_bundle), "--output", str(out), "--methods", "ip-adapter", "faceid"]
    argv += ["--scales", "0.5", "1", "--ids", "2", "--scenes-per-id", "1", "--steps", "1", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    rows = report["results"]
    assert [(r["method"], r["scale"]) for r in rows] == [
        ("ip-adapter", 0.5),
        ("ip-adapter", 1.0),
        ("faceid", 0.5),
        ("faceid", 1.0),
        ("text-scene", None),
        ("text-coarse", None),
        ("copy", None),
        ("vae", None),
        ("render", None),
    ]
    for row in rows:
        assert row["images"] == 2
        assert 0 <= row["prompt"] <= 1 and set(row["identity"]) == {"all", "coarse", "fine"}
    assert report["settings"]["ids"] == list(held_out_ids()[:2])
    table = format_table(rows)
    assert table in (out / "eval.md").read_text() and table in printed
    assert "| faceid | 0.5 |" in table and "| copy | - |" in table
    for name in ("eval.png", "samples.png"):
        assert (out / name).stat().st_size > 1000


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    rows = [
        {"method": "ip-adapter", "scale": s, "prompt": 1 - s / 2, "identity": {"all": 0.3 + s / 2}}
        for s in (0.5, 1.0)
    ]
    rows.append({"method": "copy", "scale": None, "prompt": 0.2, "identity": {"all": 1.0}})
    from PIL import Image

    path = plot(rows, tmp_path / "plot.png")
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (600, 760, 3) and (image != 255).any()


def test_cli_demo(fake_bundle, tmp_path, capsys):
    rc = main(
        [
            "demo",
            "--bundle",
            str(fake_bundle),
            "--output",
            str(tmp_path / "d"),
            "--steps",
            "1",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    record = json.loads((tmp_path / "d" / "demo.json").read_text())
    assert record["held_out"] and len(record["prompts"]) == 3
    assert list(record["scores"]) == ["ip-adapter", "ip-adapter-plus", "faceid", "instantid", "text-coarse"]
    assert "instantid" in out and "text-coarse" in out and "grid.png" in out
    from PIL import Image

    grid = Image.open(tmp_path / "d" / "grid.png")
    assert grid.width > 4 * 128 and grid.height > 5 * 128


def test_cli_says_when_the_bundle_is_missing(tmp_path, capsys):
    for command in ("demo", "eval"):
        rc = main([command, "--bundle", str(tmp_path / "missing"), "--output", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2 and "not in the world bundle" in err and str(tmp_path / "missing") in err
