"""Official checkpoint in and out: bit-exact, bf16 kept, no second copy, clear errors for the wrong file."""

from __future__ import annotations

import pytest
import torch

from idcraft.checkpoints import AdapterCheckpoint, load_checkpoint, save_checkpoint
from idcraft.errors import CheckpointError, IncompatibleAdapterError
from idcraft.instantcharacter.adapter import InstantCharacterAdapter
from idcraft.instantcharacter.tiny import random_instantcharacter, tiny_flux_transformer


@pytest.mark.parametrize("name", ["ic.safetensors", "ic.bin"])
def test_round_trip_is_bit_exact_and_keeps_bf16(saved, tmp_path, name):
    original = load_checkpoint(saved / name)
    adapter = InstantCharacterAdapter.from_checkpoint(saved / name)
    assert {p.dtype for p in adapter.parameters()} == {torch.bfloat16}
    save_checkpoint(adapter.to_checkpoint(), tmp_path / name)
    again = load_checkpoint(tmp_path / name)
    for group in ("image_proj", "ip_adapter"):
        a, b = getattr(original, group), getattr(again, group)
        assert list(a) == list(b)  # same keys, same order
        assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    if name.endswith(".safetensors"):
        assert (tmp_path / name).read_bytes() == (saved / name).read_bytes()


def test_loading_takes_the_files_tensors_without_copying(saved):
    ckpt = load_checkpoint(saved / "ic.safetensors")
    adapter = InstantCharacterAdapter.from_checkpoint(ckpt)
    assert adapter.projector.resampler.latents.data_ptr() == ckpt.image_proj["resampler.latents"].data_ptr()
    assert adapter.layers["2"].to_k_ip.weight.data_ptr() == ckpt.ip_adapter["2.to_k_ip.weight"].data_ptr()
    assert not any(p.is_meta for p in adapter.parameters())


def test_widths_and_counts_come_from_the_file(saved):
    adapter = InstantCharacterAdapter.from_checkpoint(saved / "ic.bin")
    config = adapter.projector.config
    assert (config.width, config.num_tokens, config.output_width, config.resampler_depth) == (128, 16, 32, 2)
    assert len(adapter.layers) == 3 and adapter.layers["0"].head_dim == 16


def test_wrong_block_count_is_refused(ic_adapter):
    deeper = tiny_flux_transformer(double=2, single=3)
    with pytest.raises(
        IncompatibleAdapterError, match=r"weights for 3 FLUX blocks.*has 5 \(2 double \+ 3 single"
    ):
        ic_adapter.check_compatible(deeper, base_name="base model X")


def test_wrong_width_is_refused(flux):
    from diffusers import FluxTransformer2DModel

    wide = FluxTransformer2DModel(
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        in_channels=16,
        axes_dims_rope=(4, 6, 6),
    )
    adapter = random_instantcharacter(flux.transformer)
    with pytest.raises(IncompatibleAdapterError, match=r"width 32 with heads of 16.*works at width 48"):
        adapter.check_compatible(wide)
    with pytest.raises(IncompatibleAdapterError, match=r"features of width 128.*give 96"):
        adapter.check_compatible(None, 96, encoder_name="image encoders A, B")


def test_not_an_instantcharacter_file(ic_adapter):
    ckpt = ic_adapter.to_checkpoint()
    broken = AdapterCheckpoint(
        {k: v for k, v in ckpt.image_proj.items() if not k.startswith("resampler.latents")}, ckpt.ip_adapter
    )
    with pytest.raises(CheckpointError, match=r"no 'resampler.latents'"):
        InstantCharacterAdapter.from_checkpoint(broken)
    odd = AdapterCheckpoint(ckpt.image_proj, {**ckpt.ip_adapter, "0.to_k_ip_lora.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected ip_adapter key '0.to_k_ip_lora.weight'"):
        InstantCharacterAdapter.from_checkpoint(odd)
    gap = AdapterCheckpoint(
        ckpt.image_proj, {k: v for k, v in ckpt.ip_adapter.items() if not k.startswith("1.")}
    )
    with pytest.raises(CheckpointError, match=r"numbered 0\.\.2, expected 0\.\.N-1"):
        InstantCharacterAdapter.from_checkpoint(gap)
    bad = dict(ckpt.image_proj)
    bad["proj.fc2.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"image_proj does not fit the shapes"):
        InstantCharacterAdapter.from_checkpoint(AdapterCheckpoint(bad, ckpt.ip_adapter))
