"""``idcraft world build --profile tiny``: every stage of a rebuild end to end at toy sizes (about half a
minute on two CPU cores), as the GPU profile runs it -- 8 latent channels through the UNet, IdentityNet and
every adapter, the VAE ceiling, packing after each stage, the log in BUILD.json -- then the archives
unpacked into a bundle that the world's generator draws with, every method."""

from __future__ import annotations

import json
import time

import pytest
import torch

from idcraft.cli import main
from idcraft.world import bundle
from idcraft.world.pack import MAX_PART_BYTES, MAX_PARTS
from idcraft.world.rebuild import STAGES


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy models gain nothing from two threads, and on a machine shared with other jobs two threads
    spin-wait on each other (the tiny build measured 20 s on one thread, 107 s on two, beside other work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("tiny")
    started = time.perf_counter()
    args = ["world", "build", "--profile", "tiny", "--device", "cpu", "--workers", "1"]
    assert main([*args, "--output", str(root / "bundle"), "--pack", str(root / "out")]) == 0
    return root, time.perf_counter() - started


def test_every_stage_is_built_recorded_and_packed(built):
    root, seconds = built
    # about 20 s on one free core; the bound only catches a profile that stopped being tiny
    assert seconds < 180, f"the tiny build took {seconds:.0f} s: make the profile tinier"
    record = json.loads((root / "bundle" / bundle.BUILD_RECORD).read_text())
    assert sorted(record["stages"]) == sorted(STAGES) and not record.get("failures")
    run = record["runs"][-1]
    assert run["command"].startswith("idcraft") and run["seconds"] > 0
    assert any(line.startswith("[instantid] done") for line in run["log"])
    assert any(line.startswith("[pack] generation") for line in run["log"])
    ceiling = record["stages"]["decoder"]["measurements"]["ceiling"]
    assert {"vae", "render", "psnr_face"} <= set(ceiling) and 0 <= ceiling["vae"]["fine"] <= 1
    assert record["stages"]["vae"]["measurements"]["config"]["latent_channels"] == 8

    archives = sorted((root / "out").iterdir())
    assert 1 <= len(archives) <= MAX_PARTS and all(p.stat().st_size <= MAX_PART_BYTES for p in archives)


def test_the_unpacked_bundle_generates_with_every_method(built):
    from idcraft.world.generate import ADAPTER_METHODS, Request, WorldGenerator
    from idcraft.world.identity import held_out_ids
    from idcraft.world.scene import Scene

    root, _ = built
    assert main(["world", "unpack", "--from", str(root / "out"), "--output", str(root / "restored")]) == 0
    restored = json.loads((root / "restored" / bundle.BUILD_RECORD).read_text())
    assert sorted(restored["stages"]) == sorted(STAGES)
    controlnet = json.loads((root / "restored" / bundle.IDENTITYNET / "config.json").read_text())
    assert controlnet["in_channels"] == 8

    generator = WorldGenerator(root / "restored", device="cpu")
    assert generator.base.unet.config.in_channels == generator.base.vae.config.latent_channels == 8
    request = [Request(held_out_ids()[0], Scene("beach", "left", "large", "standing", 0), 1)]
    for method in (*ADAPTER_METHODS, "text-coarse", "vae"):
        image = generator.generate(method, request, steps=2)
        assert image.shape == (1, 64, 64, 3), method


def test_a_finished_build_is_skipped_and_a_failing_stage_recorded_with_keep_going(built, monkeypatch, capsys):
    from idcraft.world import rebuild

    root, _ = built
    capsys.readouterr()

    def broken(b, out, s):
        raise RuntimeError("boom")

    monkeypatch.setitem(rebuild.STAGE_FUNCTIONS, "unet_detail", broken)
    record = rebuild.rebuild(
        root / "bundle",
        profile="tiny",
        stages=["unet_detail", "decoder"],
        force=["unet_detail"],
        keep_going=True,
    )
    out = capsys.readouterr().out
    assert "[unet_detail] FAILED" in out and "[decoder] exists, skipped" in out
    assert record["failures"]["unet_detail"]["error"] == "RuntimeError: boom"
    assert record["runs"][-1]["failed"] == {"unet_detail": "RuntimeError: boom"}
    with pytest.raises(RuntimeError, match="boom"):  # without keep_going a failure stops the build
        rebuild.rebuild(root / "bundle", profile="tiny", stages=["unet_detail"], force=["unet_detail"])


def test_an_adapter_stage_with_a_time_cap_probes_then_resumes(built, monkeypatch):
    """A capped adapter stage trains a few steps, times them, and resumes for what fits the budget: all
    of ``max_steps`` with time to spare, only the probe when the budget is already spent."""
    from idcraft.world import rebuild

    root, _ = built
    monkeypatch.setattr(rebuild, "PROBE_STEPS", 2)
    monkeypatch.setitem(rebuild.PROFILES["tiny"], "ip-adapter", {"max_steps": 4, "max_seconds": 600})
    record = rebuild.rebuild(root / "bundle", profile="tiny", stages=["ip-adapter"], force=["ip-adapter"])
    done = record["stages"]["ip-adapter"]["measurements"]
    assert (done["probe_steps"], done["steps_done"], done["stopped_by"]) == (2, 4, "steps")
    assert done["steps"] == 4 and done["seconds_per_step"] > 0

    monkeypatch.setitem(rebuild.PROFILES["tiny"], "ip-adapter", {"max_steps": 4, "max_seconds": 1e-3})
    record = rebuild.rebuild(root / "bundle", profile="tiny", stages=["ip-adapter"], force=["ip-adapter"])
    done = record["stages"]["ip-adapter"]["measurements"]
    assert (done["steps_done"], done["stopped_by"]) == (2, "time")
    assert (root / "bundle" / "adapters" / "ip-adapter_world.safetensors").is_file()
