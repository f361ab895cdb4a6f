"""Finding and loading the released layout, with one-line errors for what is not it."""

from __future__ import annotations

import shutil

import pytest
import torch

from idcraft.errors import CheckpointError, IdcraftError
from idcraft.infiniteyou.release import is_release, load_image_proj, locate_release

from .conftest import CASE

VERSION = CASE / "release" / "aes_stage2"


def test_locate_version_folder_parent_and_root(tmp_path):
    assert locate_release(VERSION).infusenet == VERSION / "InfuseNetModel"
    assert locate_release(CASE / "release").image_proj == VERSION / "image_proj_model.bin"
    root = tmp_path / "InfiniteYou" / "infu_flux_v1.0"
    shutil.copytree(VERSION, root / "sim_stage1")
    found = locate_release(tmp_path / "InfiniteYou", "sim_stage1")
    assert found.infusenet == root / "sim_stage1" / "InfuseNetModel"
    assert is_release(tmp_path / "InfiniteYou") and is_release(VERSION / "image_proj_model.bin")
    with pytest.raises(IdcraftError, match="no InfuseNetModel/"):
        locate_release(tmp_path / "InfiniteYou", "aes_stage2")


def test_parts_given_separately():
    paths = locate_release(VERSION / "image_proj_model.bin", infusenet=VERSION / "InfuseNetModel")
    assert paths.image_proj.name == "image_proj_model.bin"
    with pytest.raises(IdcraftError, match="--controlnet"):
        locate_release(VERSION / "image_proj_model.bin")


def test_folder_without_infusenet_and_unknown_version(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(IdcraftError, match="has no InfuseNetModel/ .found stuff/"):
        locate_release(tmp_path)
    with pytest.raises(IdcraftError, match="aes_stage2 and sim_stage1"):
        locate_release(VERSION, "stage3")


def test_resampler_widths_come_from_the_file(tmp_path):
    resampler = load_image_proj(VERSION / "image_proj_model.bin")
    assert resampler.config.dim == 64 and resampler.config.output_dim == 32
    assert resampler.config.num_queries == 8 and resampler.config.embed_dim == 512
    bad = tmp_path / "image_proj_model.bin"
    torch.save({"proj": {}}, bad)
    with pytest.raises(CheckpointError, match="expected \\{'image_proj'"):
        load_image_proj(bad)


def test_sd_base_refused(tmp_path):
    from idcraft.engine import Engine

    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(IdcraftError, match="InfiniteYou runs on FLUX.1"):
        Engine.from_pretrained(tmp_path / "sd", VERSION, method="infiniteyou", device="cpu")


def test_method_is_recognised_from_the_release_folder():
    from idcraft.engine import _choose_method

    assert _choose_method(None, CASE / "base", None, CASE / "release").name == "infiniteyou"
    assert _choose_method(None, CASE / "base", None, CASE / "embedding.npy").name == "instantcharacter"
