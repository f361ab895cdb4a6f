"""``idcraft world build``'s plumbing: every profile can run every stage, bad names are refused up front,
and a finished stage is not trained again (an interrupted build continues where it stopped)."""

from __future__ import annotations

import json

import pytest

from idcraft.errors import IdcraftError
from idcraft.world import bundle
from idcraft.world.rebuild import ADAPTER_STAGES, PROFILES, STAGES, rebuild

ADAPTER_KEYS = {"samples", "seed", "max_steps", "batch_size", "learning_rate", "lora_rank"}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_sets_every_stage(profile):
    settings = PROFILES[profile]
    assert {"samples", "seed"} <= set(settings["renders"])
    for stage in STAGES:
        if stage in ADAPTER_STAGES:
            assert ADAPTER_KEYS <= set({**settings["adapters"], **settings.get(stage, {})}), stage
        else:
            assert {"steps", "batch_size", "learning_rate", "seed"} <= set(settings[stage]), stage
    assert set(settings) <= {"renders", "adapters", *STAGES}, "a setting for a stage that does not exist"


def test_unknown_stage_and_profile_are_refused_before_any_work(tmp_path):
    with pytest.raises(IdcraftError, match="unknown stage 'unet'"):
        rebuild(tmp_path / "a", stages=["unet"])
    with pytest.raises(IdcraftError, match="profile 'fast'"):
        rebuild(tmp_path / "b", profile="fast")
    assert not (tmp_path / "a").exists()


def test_a_recorded_stage_with_its_output_is_skipped(tmp_path, capsys):
    (tmp_path / bundle.JUDGE).mkdir(parents=True)
    record = {"stages": {"judge": {"seconds": 1.0, "settings": {}}}}
    (tmp_path / bundle.BUILD_RECORD).write_text(json.dumps(record))
    result = rebuild(tmp_path, profile="reduced", stages=["judge"])
    assert "[judge] exists, skipped" in capsys.readouterr().out
    assert result["stages"]["judge"]["seconds"] == 1.0  # not retrained
    assert json.loads((tmp_path / bundle.BUILD_RECORD).read_text())["profile"] == "reduced"
