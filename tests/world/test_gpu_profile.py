"""The ``h200`` build profile, checked without a GPU: its models fit what a GPU run can bring back (at most
7 archives of 16 MiB) and, in float16, the 64 MB the bundle may weigh; its time caps fit the device tool's
10-minute command; the script that runs it is well formed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from idcraft.world import bundle
from idcraft.world.pack import MAX_PART_BYTES, MAX_PARTS
from idcraft.world.rebuild import ADAPTER_STAGES, PROFILES, STAGES

REPO = Path(__file__).resolve().parents[2]
H200 = PROFILES["h200"]


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_h200_models_fit_the_pack_and_the_bundle_in_float16():
    from diffusers import ControlNetModel
    from transformers import CLIPVisionModelWithProjection

    from idcraft.tiny import random_adapter
    from idcraft.training.instantid import CONDITIONING_CHANNELS
    from idcraft.world.tokenizer import clip_tokenizer
    from idcraft.world.trainers.text_unet import DEFAULT_CONFIG, build_text_encoder, build_unet
    from idcraft.world.trainers.vae import DEFAULT_CONFIG as VAE_CONFIG
    from idcraft.world.trainers.vae import build_vae

    sd_config = {**DEFAULT_CONFIG, **H200["text_unet"]["config"]}
    vae = build_vae({**VAE_CONFIG, **H200["vae"]["config"]})
    assert vae.config.latent_channels == 8
    unet = build_unet(sd_config, vae.config.latent_channels)
    text_encoder = build_text_encoder(sd_config, clip_tokenizer())
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS[:3]
    )
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(bundle.bundle_dir() / bundle.IMAGE_ENCODER))
    adapters = 0
    for method in ADAPTER_STAGES:
        checkpoint = random_adapter(
            unet, method, encoder, lora_rank=H200["adapters"]["lora_rank"]
        ).to_checkpoint()
        adapters += sum(
            t.numel() for group in (checkpoint.image_proj, checkpoint.ip_adapter) for t in group.values()
        )
    new = (
        _params(unet) + _params(text_encoder) + _params(controlnet) + 2 * _params(vae) + adapters
    )  # + work/vae
    # the models the profile keeps the shipped sizes of: judge, identity, CLIP role, tokenizer, configs
    shipped = bundle.bundle_dir()
    kept = 0
    for path in shipped.rglob("*"):
        rel = path.relative_to(shipped).as_posix()
        if not path.is_file() or rel.startswith(
            (bundle.SD + "/unet", bundle.SD + "/vae", bundle.SD + "/text_encoder")
        ):
            continue
        if rel.startswith("adapters/"):
            continue
        float32 = rel.endswith(".safetensors") and not rel.endswith("familiarity.safetensors")
        kept += path.stat().st_size // 2 if float32 else path.stat().st_size
    packed = 2 * new + kept  # float16
    assert packed < MAX_PARTS * (MAX_PART_BYTES - 2**20), f"{packed / 2**20:.1f} MiB do not fit the pack"
    bundle_float16 = packed - 2 * _params(vae)  # work/vae travels in the pack, not in a bundle
    assert bundle_float16 < 64 * 2**20, f"{bundle_float16 / 2**20:.1f} MiB: over the 64 MB bundle"


def test_h200_time_caps_fit_one_device_command():
    caps = [H200[stage]["max_seconds"] for stage in STAGES if stage not in ADAPTER_STAGES]
    adapters = [{**H200["adapters"], **H200.get(stage, {})}["max_seconds"] for stage in ADAPTER_STAGES]
    # fixed costs measured or estimated in rebuild.py's table: renders, start-up, set-up per stage, packing
    assert sum(caps) + sum(adapters) + 150 <= 550, "the caps leave no room for the fixed costs"
    for stage in STAGES:  # every stage runs the fast path's large batches
        settings = {**H200["adapters"], **H200.get(stage, {})} if stage in ADAPTER_STAGES else H200[stage]
        assert settings["batch_size"] >= 256, stage


@pytest.mark.skipif(subprocess.run(["bash", "--version"], capture_output=True).returncode, reason="no bash")
def test_the_gpu_script_parses_and_names_the_profile():
    script = REPO / "scripts" / "gpu_world_build.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--profile" in text and 'PROFILE="${PROFILE:-h200}"' in text and "--pack" in text
    docs = (REPO / "docs" / "world-gpu.md").read_text()
    assert "bash scripts/gpu_world_build.sh" in docs and '".whl"' in docs
