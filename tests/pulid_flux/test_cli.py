"""`idcraft generate --method pulid-flux` end to end (release with IDFormer, tiny EVA-CLIP tower, saved raw
embedding, aligned face and label map), detection from keys, and the clear errors."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from idcraft.cli import main

from .conftest import CASE, EVA


def _args(root, **overrides) -> list[str]:
    flags = {
        "method": "pulid-flux",
        "base": CASE / "base",
        "adapter": root / "pulid_flux.safetensors",
        "eva-clip": EVA,
        "face-embedding": root / "emb.npy",
        "aligned-face": root / "face.png",
        "face-parsing": root / "labels.png",
        "prompt": "portrait of the cat",
        "steps": 2,
        "width": 64,
        "height": 48,
        "output": root / "out" / "id.png",
        "device": "cpu",
        "overwrite": None,
    } | overrides
    args = ["generate"]
    for key, value in flags.items():
        if key == "overwrite":
            args.append("--overwrite")
        elif value is not None:
            args += [f"--{key}", str(value)]
    return args


def test_generate_end_to_end_matches_the_pipeline(saved, flux_base, release_tensors, capsys):
    """The CLI's image = the pipeline's own call with the encoder's tokens (every stage given)."""
    assert main(_args(saved, method=None, **{"start-step": 1})) == 0  # method detected from the keys
    err = capsys.readouterr().err
    assert "memory estimate (float32, offload none, on cpu)" in err
    ours = np.asarray(Image.open(saved / "out" / "id.png"), dtype=np.int16)

    from idcraft.pulid.encoder import FaceStages
    from idcraft.pulid.eva_clip import load_eva_tower
    from idcraft.pulid.flux_pipeline import PulidFluxAdapter, PulidFluxPipeline

    adapter = PulidFluxAdapter.from_tensors(dict(release_tensors))
    pipe = PulidFluxPipeline(flux_base, adapter, device="cpu")
    try:
        pipe.encoder.eva = load_eva_tower(EVA)
        face = FaceStages(
            embedding=np.load(saved / "emb.npy"),
            aligned_face=np.asarray(Image.open(saved / "face.png")),
            parsing=np.asarray(Image.open(saved / "labels.png")),
        )
        tokens = pipe.encode([face])
        assert tokens.cond.shape == (1, 32, 32) and not torch.equal(tokens.cond, tokens.uncond)
        image = pipe("portrait of the cat", tokens, start_step=1, steps=2, width=64, height=48, seed=0)[0]
        assert np.abs(np.asarray(image, dtype=np.int16) - ours).max() <= 1
        scale_zero = pipe("portrait of the cat", tokens, scale=0, steps=2, width=64, height=48, seed=0)[0]
        assert np.abs(np.asarray(scale_zero, dtype=np.int16) - ours).mean() > 1  # the identity acts
    finally:
        adapter.pulid_ca.detach()


def test_sdxl_release_on_flux_is_refused(saved, capsys):
    from safetensors.torch import save_file

    sdxl = saved / "pulid_v1.1.safetensors"
    save_file(
        {
            "id_adapter.latents": torch.zeros(1, 4, 8),
            "id_adapter_attn_layers.1.id_to_k.weight": torch.zeros(8, 8),
        },
        str(sdxl),
    )
    assert main(_args(saved, method=None, adapter=sdxl)) != 0
    assert "PuLID SDXL file" in capsys.readouterr().err
    assert main(_args(saved, adapter=sdxl)) != 0
    assert "PuLID SDXL file" in capsys.readouterr().err


def test_flux_release_on_an_sd_base_is_refused(saved, tmp_path, capsys):
    from idcraft.tiny import tiny_sd15_pipeline

    tiny_sd15_pipeline().save_pretrained(tmp_path / "sd15")
    assert main(_args(saved, base=tmp_path / "sd15")) != 0
    err = capsys.readouterr().err
    assert "PuLID-FLUX file" in err and "StableDiffusionPipeline" in err


def test_wrong_eva_width_and_missing_stages_are_clear(saved, tmp_path, capsys):
    from idcraft.pulid.eva_clip import EvaVisionConfig, EvaVisionTower

    wrong = tmp_path / "eva_wrong.pt"
    config = EvaVisionConfig(width=64, layers=21, head_width=32, image_size=56, embed_dim=24)
    torch.save(EvaVisionTower(config).state_dict(), wrong)
    assert main(_args(saved, **{"eva-clip": wrong})) != 0
    assert "use EVA02_CLIP_L_336_psz14_s6B.pt" in capsys.readouterr().err

    assert main(_args(saved, **{"aligned-face": None, "face-parsing": None})) != 0
    assert "give the reference photo" in capsys.readouterr().err
    assert main(_args(saved, **{"scale": 0.5, "s-scale": 2.0})) != 0
    assert "--s-scale" in capsys.readouterr().err
