"""``idcraft world pack`` / ``unpack``: a bundle as a few float16 archives of bounded size (what a GPU run
can bring back), restored file for file; a newer generation replaces an older one only once complete."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from idcraft.cli import main
from idcraft.errors import IdcraftError
from idcraft.world import bundle
from idcraft.world.pack import (
    MAX_PART_BYTES,
    MAX_PARTS,
    PACK_INFO,
    find_generation,
    pack_bundle,
    unpack_bundle,
)


def _bundle(root: Path, big: int = 300_000) -> Path:
    """A small bundle-shaped folder: a float32 model larger than one test part, a file kept in float32,
    an integer buffer, a config, a work/ folder (only work/vae travels)."""
    generator = torch.Generator().manual_seed(0)
    (root / "sd" / "unet").mkdir(parents=True)
    save_file(
        {"w": torch.randn(big, generator=generator), "steps": torch.arange(5)},
        str(root / "sd" / "unet" / "diffusion_pytorch_model.safetensors"),
        metadata={"format": "pt"},
    )
    (root / "sd" / "unet" / "config.json").write_text('{"in_channels": 8}\n')
    (root / "identity").mkdir()
    save_file(
        {"whitening": torch.randn(4, 4, generator=generator) * 1e-3},
        str(root / "identity" / "familiarity.safetensors"),
    )
    save_file({"huge": torch.tensor([1e6, -2.0])}, str(root / "identity" / "detector.safetensors"))
    (root / "work" / "vae").mkdir(parents=True)
    (root / "work" / "vae" / "config.json").write_text("{}\n")
    (root / "work" / "world-1-0.npz").write_bytes(b"renders")
    (root / bundle.BUILD_RECORD).write_text(json.dumps({"stages": {"vae": {}, "text_unet": {}}}))
    return root


def test_round_trip_float16_split_over_parts(tmp_path):
    root = _bundle(tmp_path / "b")
    info = pack_bundle(root, tmp_path / "out", max_part_bytes=600_000)
    assert info["parts"] >= 2 and info["stages"] == ["text_unet", "vae"]
    paths = [Path(p) for p in info["paths"]]
    assert all(p.stat().st_size <= 600_000 for p in paths)
    names = {e["path"] for e in info["files"]}
    assert "work/vae/config.json" in names and "work/world-1-0.npz" not in names
    unet = next(e for e in info["files"] if e["path"].endswith("diffusion_pytorch_model.safetensors"))
    assert len(unet["members"]) >= 2  # 1.2 MB of float32 is 0.6 MB in float16: over one 0.6 MB part
    with tarfile.open(paths[-1]) as tar:  # every part carries the whole index
        assert json.loads(tar.extractfile(PACK_INFO).read())["files"] == info["files"]

    out = tmp_path / "restored"
    unpack_bundle(tmp_path / "out", out)
    before = load_file(str(root / "sd/unet/diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "sd/unet/diffusion_pytorch_model.safetensors"))
    assert after["w"].dtype == torch.float32 and torch.equal(after["steps"], before["steps"])
    assert torch.equal(after["w"], before["w"].half().float())
    familiarity = load_file(str(out / "identity/familiarity.safetensors"))
    assert torch.equal(
        familiarity["whitening"], load_file(str(root / "identity/familiarity.safetensors"))["whitening"]
    )
    assert load_file(str(out / "identity/detector.safetensors"))["huge"][0] == 1e6  # beyond float16: kept
    assert (out / "sd/unet/config.json").read_text() == '{"in_channels": 8}\n'

    half = tmp_path / "half"
    unpack_bundle(tmp_path / "out", half, float16=True)
    assert load_file(str(half / "sd/unet/diffusion_pytorch_model.safetensors"))["w"].dtype == torch.float16


def test_generations_replace_each_other_and_damage_is_refused(tmp_path):
    root = _bundle(tmp_path / "b", big=1000)
    first = pack_bundle(root, tmp_path / "out")
    (root / "sd" / "unet" / "config.json").write_text('{"in_channels": 16}\n')
    second = pack_bundle(root, tmp_path / "out")
    assert second["generation"] == first["generation"] + 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        Path(p).name for p in second["paths"]
    )
    # an incomplete newer generation (a run cut off while packing) is passed over
    (tmp_path / "out" / "world-bundle-g099-1of2.tar").write_bytes(b"partial")
    assert find_generation(tmp_path / "out")[0] == second["generation"]
    unpack_bundle(tmp_path / "out", tmp_path / "r")
    assert json.loads((tmp_path / "r/sd/unet/config.json").read_text())["in_channels"] == 16

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    source = Path(second["paths"][0])
    with tarfile.open(source) as tar, tarfile.open(damaged / source.name, "w") as out:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            if member.name.endswith("config.json") and "unet" in member.name:
                data = data.replace(b"16", b"32")
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    with pytest.raises(IdcraftError, match="damaged"):
        unpack_bundle(damaged, tmp_path / "r2")
    with pytest.raises(IdcraftError, match="no complete set"):
        unpack_bundle(tmp_path / "r", tmp_path / "r3")


def test_too_many_parts_are_refused_before_writing(tmp_path):
    root = _bundle(tmp_path / "b")
    with pytest.raises(IdcraftError, match="more than the 1 allowed"):
        pack_bundle(root, tmp_path / "out", max_part_bytes=400_000, max_parts=1)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_shipped_bundle_packs_within_the_device_limits(tmp_path, capsys):
    """The shipped bundle (62 MiB in float32) travels in 3 archives; the CLI restores it and the loaders
    read it."""
    assert (
        main(["world", "pack", "--bundle", str(bundle.bundle_dir()), "--output", str(tmp_path / "out")]) == 0
    )
    parts = sorted((tmp_path / "out").iterdir())
    assert 1 < len(parts) <= MAX_PARTS and all(p.stat().st_size <= MAX_PART_BYTES for p in parts)
    assert (
        main(
            ["world", "unpack", "--from", str(tmp_path / "out"), "--output", str(tmp_path / "b"), "--float16"]
        )
        == 0
    )
    assert "unpacked generation 1" in capsys.readouterr().out
    from diffusers import AutoencoderKL

    from idcraft.world.judge import Judge

    vae = AutoencoderKL.from_pretrained(str(tmp_path / "b" / bundle.SD / "vae"))
    assert next(vae.parameters()).dtype == torch.float32  # float16 files load into float32 models
    Judge.load(tmp_path / "b" / bundle.JUDGE)
    size = sum(p.stat().st_size for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert size < 40 * 2**20  # float16: about half the 62 MiB
