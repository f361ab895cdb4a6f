"""Contract: PuLID-FLUX reproduces the official code's images (tests/fixtures/pulid-flux: official
flux/sampling.py + flux/model.py with pulid_ca on a tiny random FLUX, float32 CPU) within 2/255: through the
engine from fixed ID tokens in every mode (ID weight, start step, true CFG with uncond tokens, no identity),
and through `idcraft generate` from the given stages (raw embedding, aligned face, label map) with the
official pipeline_flux.get_id_embedding chain (EVA02-CLIP tower, IDFormer)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from .conftest import CASE, case_args, case_tokens


@pytest.fixture(scope="module")
def engine(flux_base):
    from idcraft.engine import Engine
    from idcraft.pulid.flux_pipeline import PulidFluxAdapter, PulidFluxPipeline

    adapter = PulidFluxAdapter.from_file(CASE / "pulid_flux_tiny.safetensors")
    pipe = PulidFluxPipeline(flux_base, adapter, device="cpu")
    yield Engine([pipe])
    adapter.pulid_ca.detach()


@pytest.mark.parametrize("case", ["default", "scale", "start_step", "true_cfg", "no_id"])
def test_reproduces_official_pulid_flux(engine, case):
    from idcraft.engine import GenerationRequest

    args = case_args()[case]
    tokens = case_tokens()
    request = GenerationRequest(
        args["prompt"],
        method="pulid-flux",
        conditioning=tokens,
        negative_prompt=args["negative_prompt"],
        scale=args["scale"] if args["use_id"] else 0.0,
        start_step=args["start_step"],
        true_cfg=args["true_cfg"],
        seed=args["seed"],
        steps=args["steps"],
        guidance=args["guidance"],
        width=args["width"],
        height=args["height"],
    )
    image = engine.generate(request).images[0]
    ours = np.asarray(image, dtype=np.int16)
    expected = np.asarray(Image.open(CASE / f"{case}.png").convert("RGB"), dtype=np.int16)
    assert ours.shape == expected.shape == (128, 96, 3)
    assert np.abs(ours - expected).max() <= 2
    if case != "no_id":  # the identity really acts
        base_only = np.asarray(Image.open(CASE / "no_id.png").convert("RGB"), dtype=np.int16)
        assert np.abs(ours - base_only).mean() > 2


@pytest.mark.parametrize("case", ["chain", "chain_true_cfg"])
def test_generate_reproduces_the_official_chain(case, tmp_path):
    from idcraft.cli import main

    sdxl = CASE.parent / "pulid-sdxl"  # the stages and EVA tower shared with the SDXL fixture
    args = case_args("chain_args.json")[case]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items() if v != ""]
    common = [
        "generate", *flags, "--base", str(CASE / "base"), "--adapter", str(CASE / "pulid_flux_tiny.safetensors"),
        "--eva-clip", str(sdxl / "eva_tiny.pt"), "--face-embedding", str(sdxl / "embedding_0.npy"),
        "--aligned-face", str(sdxl / "aligned_0.png"), "--face-parsing", str(sdxl / "parsing_0.png"),
        "--device", "cpu",
    ]  # fmt: skip
    assert main([*common, "--output", str(tmp_path / "out.png")]) == 0  # the method comes from the file
    ours = np.asarray(Image.open(tmp_path / "out.png"), dtype=np.int16)
    expected = np.asarray(Image.open(CASE / f"{case}.png").convert("RGB"), dtype=np.int16)
    assert np.abs(ours - expected).max() <= 2
    if case == "chain":  # the identity really acts
        assert main([*common, "--scale=0", "--output", str(tmp_path / "base.png")]) == 0
        base = np.asarray(Image.open(tmp_path / "base.png"), dtype=np.int16)
        assert np.abs(base - expected).mean() > 2
