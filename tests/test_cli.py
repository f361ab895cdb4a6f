"""`idcraft generate` as a user meets it: outputs, and clear one-line errors for bad input."""

from __future__ import annotations

import pytest

from idcraft.checkpoints import save_checkpoint
from idcraft.cli import main
from idcraft.tiny import random_adapter, tiny_sdxl_unet


@pytest.fixture
def models(tmp_path, sd15, encoder, reference_image):
    sd15.save_pretrained(tmp_path / "base")
    encoder.model.save_pretrained(tmp_path / "image_encoder")
    save_checkpoint(
        random_adapter(sd15.unet, "ip-adapter-plus", encoder.model).to_checkpoint(),
        tmp_path / "plus.safetensors",
    )
    save_checkpoint(
        random_adapter(tiny_sdxl_unet(), "ip-adapter", encoder.model).to_checkpoint(), tmp_path / "xl.bin"
    )
    reference_image.save(tmp_path / "ref.png")
    return tmp_path


def _args(m, **overrides) -> list[str]:
    flags = {
        "base": m / "base",
        "adapter": m / "plus.safetensors",
        "image-encoder": m / "image_encoder",
        "reference": m / "ref.png",
        "prompt": "a cat",
        "steps": 2,
        "width": 64,
        "height": 64,
        "output": m / "out" / "img.png",
        "device": "cpu",
    } | overrides
    return ["generate"] + [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def test_generate_writes_numbered_images(models, capsys):
    assert main(_args(models, **{"num-images": 2})) == 0
    assert sorted(p.name for p in (models / "out").iterdir()) == ["img-0.png", "img-1.png"]
    assert "img-0.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"adapter": "xl.bin"}, r"cross-attention width 64.*has 32"),
        ({"reference": "missing.png"}, r"missing\.png: no such file"),
        ({"adapter": "nothing.bin"}, r"no such adapter file"),
        (
            {"method": "ip-adapter"},
            r"--method ip-adapter expects a linear projection.*--method ip-adapter-plus",
        ),
        ({"base": "someone/not-downloaded-model"}, r"not a local directory.*--local-dir"),
        ({"image-encoder": "./no/such/encoder"}, r"no such directory"),
    ],
)
def test_bad_input_gives_a_clear_error(models, capsys, overrides, message):
    import re

    resolved = {k: (models / v if k in ("adapter", "reference") else v) for k, v in overrides.items()}
    assert main(_args(models, **resolved)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err, re.S), err
    assert "Traceback" not in err
    assert not (models / "out").exists(), "nothing is written when the input is bad"


def test_truncated_adapter(models, capsys):
    data = (models / "plus.safetensors").read_bytes()
    (models / "cut.safetensors").write_bytes(data[:1000])
    assert main(_args(models, adapter=models / "cut.safetensors")) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_cheap_mistakes_fail_before_torch_loads(models, tmp_path):
    """Settings, devices, output paths and option/method mismatches are refused in a fraction of a second:
    no torch, no diffusers imported."""
    import subprocess
    import sys

    base = [
        "generate",
        "--base",
        str(models / "base"),
        "--adapter",
        "a.bin",
        "--reference",
        "r.png",
        "--prompt",
        "p",
    ]
    cases = {
        "--width 65": "multiple of 8",
        "--scale nan": "finite",
        "--device tpu": "not a device",
        "--seed 123456789012345678901234": "--seed",
        f"--output {tmp_path}": "is a directory",
        "--method instantcharacter --keypoints k.json": "not used by instantcharacter",
    }
    for extra, message in cases.items():
        code = (
            "import sys; from idcraft.cli import main; rc = main(sys.argv[1:]); "
            "print('HEAVY' if {'torch', 'diffusers'} & set(sys.modules) else 'LIGHT', rc)"
        )
        run = subprocess.run(
            [sys.executable, "-c", code, *base, *extra.split()], capture_output=True, text=True, timeout=60
        )
        assert message in run.stderr, (extra, run.stderr)
        assert run.stdout.split() == ["LIGHT", "2"], (extra, run.stdout, run.stderr)


def test_adapter_with_nan_weights_is_refused(models, capsys):
    import torch

    from idcraft.checkpoints import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(models / "plus.safetensors")
    key = next(iter(ckpt.ip_adapter))
    ckpt.ip_adapter[key] = torch.full_like(ckpt.ip_adapter[key], float("nan"))
    save_checkpoint(ckpt, models / "nan.safetensors")
    with pytest.raises(Exception, match=f"ip_adapter.{key} holds NaN"):
        load_checkpoint(models / "nan.safetensors")


def test_broken_unet_config_is_named(models, capsys):
    import shutil

    shutil.copytree(models / "base", models / "broken")
    (models / "broken" / "unet" / "config.json").write_text("{broken")
    assert main(_args(models, base=models / "broken")) == 2
    err = capsys.readouterr().err
    assert "unet/config.json" in err and "damaged" in err and "Traceback" not in err
