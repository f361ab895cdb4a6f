"""`idcraft generate --method instantcharacter` end to end on saved tiny folders, and its clear errors."""

from __future__ import annotations

import re

import pytest

from idcraft.checkpoints import save_checkpoint
from idcraft.cli import main
from idcraft.instantcharacter.tiny import random_instantcharacter, tiny_flux_transformer


def _args(root, **overrides) -> list[str]:
    flags = {
        "method": "instantcharacter",
        "base": root / "flux",
        "adapter": root / "ic.safetensors",
        "image-encoder": root / "siglip",
        "image-encoder-2": root / "dinov2",
        "reference": root / "ref.png",
        "prompt": "a cat in the garden",
        "steps": 2,
        "width": 64,
        "height": 64,
        "scale": 0.9,
        "output": root / "out" / "cat.png",
        "device": "cpu",
    } | overrides
    return ["generate"] + [x for k, v in flags.items() if v is not None for x in (f"--{k}", str(v))]


def test_generate_end_to_end(saved, capsys):
    assert main(_args(saved, method=None, adapter=saved / "ic.bin", **{"num-images": 2})) == 0
    out = capsys.readouterr()
    assert sorted(p.name for p in (saved / "out").iterdir()) == ["cat-0.png", "cat-1.png"]
    assert "cat-0.png" in out.out
    assert "memory estimate (float32, offload none, on cpu)" in out.err and "GiB RAM" in out.err


@pytest.fixture(scope="module")
def deeper_adapter(saved):
    """An adapter made for a FLUX transformer with more blocks than the saved base has."""
    path = saved / "deeper.safetensors"
    save_checkpoint(random_instantcharacter(tiny_flux_transformer(double=2, single=3)).to_checkpoint(), path)
    return path


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"adapter": "deeper"}, r"weights for 5 FLUX blocks.*has 3 \(1 double \+ 2 single blocks\)"),
        ({"image-encoder-2": None}, r"pass --image-encoder SIGLIP_DIR .* and --image-encoder-2 DINOV2_DIR"),
        ({"offload": "model"}, r"--offload model moves weights between RAM and a GPU.*--device cuda"),
        ({"adapter": "missing.bin"}, r"no such adapter file"),
        ({"reference": "missing.png"}, r"missing\.png: no such file"),
        ({"keypoints": "kps.json"}, r"--keypoints: not used by instantcharacter"),
        (
            {"image-encoder-2": "siglip"},
            r"is a 'siglip_vision_model' model; InstantCharacter reads DINOv2 there",
        ),
    ],
)
def test_clear_errors(saved, deeper_adapter, capsys, overrides, message):
    files = {"deeper": deeper_adapter}
    overrides = {
        k: (files.get(v, saved / v) if k in ("adapter", "reference", "image-encoder-2") and v else v)
        for k, v in overrides.items()
    }
    assert main(_args(saved, **overrides)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and len(err.strip().splitlines()[-1]) > 20
    assert re.search(message, err.replace("\n", " ")), err


def test_sd_base_with_instantcharacter_is_refused(tmp_path, saved, capsys):
    from idcraft.tiny import tiny_sd15_pipeline

    tiny_sd15_pipeline().save_pretrained(tmp_path / "sd")
    assert main(_args(saved, base=tmp_path / "sd")) == 2
    assert "is a StableDiffusionPipeline; InstantCharacter runs on FLUX.1" in capsys.readouterr().err
