"""benchmarks/gpu_end_to_end.py runs on a GPU later, with little device time: CI checks its code here.

``--tiny`` runs every family end to end through the same code on tiny models on the CPU; the real-shape
configs are built on the meta device (no memory, no compute) and checked against the released models'
parameter counts, so a wrong width or depth is found here rather than on the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from .conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_end_to_end.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_end_to_end", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_tiny_run_measures_every_family(bench, tmp_path, capsys):
    output = tmp_path / "results.json"
    args = ["--tiny", "--steps", "1", "--repeats", "1", "--warmup", "0", "--dtype", "float32"]
    results = bench.main([*args, "--output", str(output)])
    assert not results["errors"]
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    rows = results["rows"]
    variants = ["bare", "method", "precomputed", "bare again"]
    assert [(r["family"], r["variant"]) for r in rows] == [(f, v) for f in bench.FAMILIES for v in variants]
    for row in rows:
        assert row["median_s"] > 0 and math.isfinite(row["ratio_time"])
        assert row["peak_gib"] is None and row["ratio_memory"] is None  # CPU: no GPU memory to report
    assert torch.get_default_dtype() == torch.float32, "the models are built without leaking the dtype"
    table = capsys.readouterr().out
    assert "| family | base, size, steps, dtype | variant |" in table
    assert table.count("| bare base pipeline |") == len(bench.FAMILIES)


def test_real_shapes_have_the_released_sizes(bench):
    """Parameter counts (millions) of the released models the configs stand for."""

    def millions(module) -> float:
        return sum(p.numel() for p in module.parameters()) / 1e6

    meta = torch.device("meta")
    with bench.building(meta, torch.float16):
        sd15 = bench.build_sd15(False)
        sdxl = bench.build_sdxl(False)
        encoder = bench.clip_vision(False)
    with bench.building(meta, torch.bfloat16):
        flux = bench.build_flux(False)
        subject = bench.subject_encoder(False)
    assert torch.get_default_dtype() == torch.float32
    expected = {
        "SD1.5 UNet": (sd15.unet, 859.5),
        "SD VAE": (sd15.vae, 83.7),
        "CLIP ViT-L text": (sd15.text_encoder, 123.1),
        "CLIP ViT-H vision": (encoder.model, 632.1),
        "SDXL UNet": (sdxl.unet, 2567.5),
        "OpenCLIP bigG text": (sdxl.text_encoder_2, 694.7),
        "FLUX.1 transformer": (flux.transformer, 11901.4),
        "T5-XXL encoder": (flux.text_encoder_2, 4762.3),
        "SigLIP so400m": (subject.siglip, 428.2),
        "DINOv2 giant": (subject.dinov2, 1136.5),
    }
    for name, (module, count) in expected.items():
        assert millions(module) == pytest.approx(count, abs=0.1), name
    assert sd15.vae_scale_factor == sdxl.vae_scale_factor == flux.vae_scale_factor == 8
