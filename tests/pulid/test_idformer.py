"""IDFormer: widths from the file, strict key match, several faces, uncond = IDFormer of zeros."""

from __future__ import annotations

import pytest
import torch

from idcraft.errors import CheckpointError
from idcraft.pulid.idformer import IDFormer


def tiny_idformer(seed: int = 0, **overrides) -> IDFormer:
    torch.manual_seed(seed)
    config = dict(
        dim=32,
        depth=5,
        heads=1,
        num_id_token=2,
        num_queries=4,
        output_dim=24,
        id_dim=48,
        vit_dim=16,
        mapping_dim=20,
    )
    return IDFormer(**(config | overrides)).eval()


def test_widths_read_from_release_keys():
    model = tiny_idformer(depth=10, heads=2)
    release = {"id_adapter." + k: v for k, v in model.state_dict().items()}
    release["id_adapter_attn_layers.1.id_to_k.weight"] = torch.zeros(8, 24)
    loaded = IDFormer.from_state_dict(release, prefix="id_adapter.")
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in model.config.items() if not k.startswith("_")
    }
    x, hidden = torch.randn(1, 48), [torch.randn(1, 7, 16) for _ in range(5)]
    assert torch.equal(loaded(x, hidden), model(x, hidden))
    assert model(x, hidden).shape == (1, 4, 24)


def test_several_faces_and_uncond():
    model = tiny_idformer()
    cond = torch.randn(1, 3, 48)
    hidden = [torch.randn(1, 3 * 7, 16) for _ in range(5)]
    assert model(cond, hidden).shape == (1, 4, 24)
    uncond = model.uncond_tokens(cond, hidden)
    expected = model(torch.zeros(1, 48), [torch.zeros(1, 7, 16) for _ in range(5)])
    assert torch.equal(uncond, expected)
    assert not torch.equal(uncond, torch.zeros_like(uncond))


def test_wrong_file_is_a_clear_error():
    sd = tiny_idformer().state_dict()
    with pytest.raises(CheckpointError, match="no pulid_encoder"):
        IDFormer.from_state_dict({"id_adapter." + k: v for k, v in sd.items()}, prefix="pulid_encoder.")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected"):
        IDFormer.from_state_dict(sd)
    del sd["extra.weight"], sd["latents"]
    with pytest.raises(CheckpointError, match="not a PuLID IDFormer"):
        IDFormer.from_state_dict(sd)
