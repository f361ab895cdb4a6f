"""EVA02 tower: the official tiny checkpoint (eva_clip layout + config JSON) reproduces the official outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from idcraft.errors import CheckpointError
from idcraft.pulid.eva_clip import EvaVisionConfig, load_eva_tower

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "pulid-eva"


def test_matches_official_module():
    tower = load_eva_tower(FIXTURE / "eva_tiny.pt")
    assert tower.config.layers == 21 and tower.config.width == 32 and tower.config.head_width == 32
    with torch.no_grad():
        cls, hidden = tower(torch.from_numpy(np.load(FIXTURE / "input.npy")))
    np.testing.assert_allclose(cls.numpy(), np.load(FIXTURE / "cls.npy"), atol=1e-5)
    np.testing.assert_allclose(torch.stack(hidden).numpy(), np.load(FIXTURE / "hidden.npy"), atol=1e-5)


def test_config_json_round_trip():
    config = EvaVisionConfig.from_json(FIXTURE / "eva_tiny.json")
    assert config.embed_dim == 24 and config.mlp_hidden == 85 and config.grid == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs(dtype):
    tower = load_eva_tower(FIXTURE / "eva_tiny.pt").to(dtype)
    cls, hidden = tower(torch.from_numpy(np.load(FIXTURE / "input.npy")).to(dtype))
    assert cls.dtype == dtype and torch.isfinite(cls).all() and len(hidden) == 5


def test_wrong_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_eva_tower(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"visual.blocks.0.norm1.weight": torch.zeros(4)}, bad)
    with pytest.raises(CheckpointError, match="not an EVA02-CLIP vision tower"):
        load_eva_tower(bad)
    config = tmp_path / "eva.json"
    config.write_text(json.dumps({"embed_dim": 8, "vision_cfg": {"rope": False}}))
    with pytest.raises(CheckpointError, match="EVA02"):
        EvaVisionConfig.from_json(config)
