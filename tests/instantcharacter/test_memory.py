"""The memory estimate: real parameter counts without loading weights, placement per offload mode."""

from __future__ import annotations

import pytest
import torch

from idcraft.errors import IdcraftError
from idcraft.instantcharacter.memory import (
    GiB,
    MemoryEstimate,
    ParamCount,
    adapter_params,
    estimate_memory,
    folder_params,
)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_counts_are_the_real_parameter_counts(saved, flux, ic_adapter, subject_encoder):
    est = estimate_memory(
        saved / "flux",
        saved / "ic.bin",
        saved / "siglip",
        saved / "dinov2",
        device=torch.device("cpu"),
        dtype=torch.float32,
        width=64,
        height=64,
    )
    real = {
        name: _numel(getattr(flux, name)) for name in ("transformer", "text_encoder", "text_encoder_2", "vae")
    }
    real |= {"siglip": _numel(subject_encoder.siglip), "dinov2": _numel(subject_encoder.dinov2)}
    real["resampler"] = _numel(ic_adapter.projector.resampler)
    real["projector"] = _numel(ic_adapter.projector) - real["resampler"]
    real["attention"] = _numel(ic_adapter.layers)
    assert {k: v.total for k, v in est.params.items()} == real
    assert est.total_params == sum(real.values())
    weights = sum(real.values()) * 4
    assert weights < est.ram_bytes < weights + 3 * GiB  # on the CPU: every weight in RAM, float32
    assert adapter_params(saved / "ic.safetensors") == adapter_params(saved / "ic.bin")
    assert "parameters (FLUX transformer" in est.summary() and "GiB RAM" in est.summary()


def test_folder_without_safetensors_is_counted_from_its_config(tmp_path, subject_encoder):
    from transformers import SiglipVisionModel

    subject_encoder.siglip.config.save_pretrained(tmp_path)  # e.g. a folder with pytorch_model.bin only
    assert folder_params(tmp_path, SiglipVisionModel).total == _numel(subject_encoder.siglip)


def _flux_12b(offload: str, gpu_free: int | None = 80 * GiB) -> MemoryEstimate:
    """FLUX.1-dev's real sizes (bf16 on a GPU) with the official adapter."""
    b = 10**9
    params = {
        "transformer": ParamCount(int(11.9 * b), 3072 * 15360),
        "text_encoder": ParamCount(int(0.123 * b), 49408 * 768),
        "text_encoder_2": ParamCount(int(4.76 * b), 32128 * 4096),
        "vae": ParamCount(int(0.084 * b), 512 * 512 * 9),
        "siglip": ParamCount(int(0.428 * b), 1152 * 4304),
        "dinov2": ParamCount(int(1.14 * b), 1536 * 6144),
        "projector": ParamCount(1_243_000_000, 21504 * 2688),
        "resampler": ParamCount(117_000_000, 5120 * 1280),
        "attention": ParamCount(1_434_816_768, 3072 * 4096),
    }
    return MemoryEstimate(params, torch.bfloat16, torch.device("cuda"), offload, GiB, gpu_free, 256 * GiB)


def test_offload_modes_place_weights_as_documented():
    none, model, seq = (_flux_12b(m) for m in ("none", "model", "sequential"))
    assert 40 * GiB < none.gpu_bytes < 45 * GiB  # 21.2B params x 2 bytes + allowances
    assert 26 * GiB < model.gpu_bytes < 30 * GiB  # transformer + adapter attention + resampler
    assert seq.gpu_bytes < 5 * GiB  # one layer (or the visiting projector half) at a time
    assert none.ram_bytes < model.ram_bytes == seq.ram_bytes


def test_not_fitting_says_what_would():
    est = _flux_12b("none", gpu_free=24 * GiB)
    est.alternatives = {m: _flux_12b(m).gpu_bytes for m in ("none", "model", "sequential")}
    assert not est.fits()
    with pytest.raises(IdcraftError, match=r"GPU memory needed, 24.0 GiB free.*--offload sequential"):
        est.check()
    assert _flux_12b("sequential", gpu_free=24 * GiB).fits()
