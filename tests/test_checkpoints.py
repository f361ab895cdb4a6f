"""Official checkpoint I/O: load -> save -> load is bit-exact; bad files fail clearly."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from idcraft.adapter import IPAdapter
from idcraft.checkpoints import AdapterCheckpoint, load_checkpoint, save_checkpoint
from idcraft.errors import CheckpointError
from idcraft.tiny import random_adapter

from .conftest import shared_path


def _assert_same(a: AdapterCheckpoint, b: AdapterCheckpoint) -> None:
    for group in ("image_proj", "ip_adapter"):
        ga, gb = a.groups()[group], b.groups()[group]
        assert list(ga) == list(gb) or sorted(ga) == sorted(gb)
        for key in ga:
            assert ga[key].dtype == gb[key].dtype, key
            assert torch.equal(ga[key], gb[key]), key


@pytest.mark.parametrize(
    "method",
    [
        "ip-adapter",
        "ip-adapter-plus",
        "ip-adapter-full-face",
        "faceid",
        "faceid-plusv2",
        "faceid-portrait",
        "instantid",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_round_trip_is_bit_exact(sd15, encoder, tmp_path, method, dtype, suffix):
    adapter = random_adapter(sd15.unet, method, encoder.model).to(dtype)
    first = adapter.to_checkpoint()
    save_checkpoint(first, tmp_path / f"a{suffix}")
    loaded = load_checkpoint(tmp_path / f"a{suffix}")
    _assert_same(first, loaded)
    # through the model and back again: module -> file -> module -> file
    rebuilt = IPAdapter.from_checkpoint(loaded, method=method)
    assert rebuilt.method.name == method
    assert [p.lora_rank for p in rebuilt.layers.values()] == [p.lora_rank for p in adapter.layers.values()]
    again = rebuilt.to_checkpoint()
    _assert_same(first, again)
    save_checkpoint(again, tmp_path / f"b{suffix}")
    if suffix == ".safetensors":
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_official_fixture_files_agree_and_round_trip(tmp_path):
    case = shared_path("fixtures", "ipadapter-sd15")
    from_bin = load_checkpoint(case / "adapter.bin")
    from_st = load_checkpoint(case / "adapter.safetensors")
    _assert_same(from_bin, from_st)
    save_checkpoint(from_st, tmp_path / "x.safetensors")
    assert (tmp_path / "x.safetensors").read_bytes() == (case / "adapter.safetensors").read_bytes()
    save_checkpoint(from_bin, tmp_path / "x.bin")
    _assert_same(from_bin, load_checkpoint(tmp_path / "x.bin"))


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_truncated_file_is_reported(sd15, encoder, tmp_path, suffix):
    path = tmp_path / f"a{suffix}"
    save_checkpoint(random_adapter(sd15.unet, "ip-adapter", encoder.model).to_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.bin"

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(path, "wb") as f:
        pickle.dump({"image_proj": Payload()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


def test_not_an_adapter(tmp_path):
    path = tmp_path / "unet.bin"
    torch.save({"conv_in.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="not an IP-Adapter checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such adapter file"):
        load_checkpoint(tmp_path / "missing.bin")
