"""A fake world bundle for tests: tiny random-weight models saved in the bundle's layout at 64x64.

The real bundle is trained by ``scripts/build_world.py``; tests of the code that *uses* it (generation,
``idcraft demo``, ``idcraft eval``) need only the structure: a diffusers SD1.5 folder whose VAE has factor
4 (64x64 output from a 16x16 latent), a CLIP vision folder, the world face analyser's models, every adapter
in its official layout, an IdentityNet folder, and a judge.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _sd_pipeline(seed: int = 0):
    """Tiny SD1.5 with a factor-4 VAE (three blocks) and a 16x16 latent: 64x64 images, like the world's."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from idcraft.tiny import tiny_sd15_unet, tiny_text_encoder, tiny_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[8, 16, 16],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        sample_size=64,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=tiny_text_encoder(seed=seed),
        tokenizer=tiny_tokenizer(),
        unet=tiny_sd15_unet(seed=seed),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _identitynet(unet, seed: int = 0):
    """A ControlNet from ``unet`` whose condition embedding downsamples 4x (the VAE's factor), with its
    zero convolutions made non-zero so it visibly acts."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16)).eval()
    with torch.no_grad():
        for conv in [
            *net.controlnet_down_blocks,
            net.controlnet_mid_block,
            net.controlnet_cond_embedding.conv_out,
        ]:
            conv.weight.normal_(0, 0.5)
    return net


def _identity_models(folder: Path, seed: int = 0) -> None:
    """The world face analyser's detector and recogniser, tiny and random; presence threshold 0 so that
    every reference has its face (a random detector's presence score is about 0.5)."""
    from idcraft.world.face_backend import DEFAULT_CONFIG, build_models, save_identity_models

    torch.manual_seed(seed)
    config = {
        **DEFAULT_CONFIG,
        "detector_widths": [8] * 4,
        "recogniser_widths": [8] * 4,
        "presence_threshold": 0.0,
    }
    save_identity_models(folder, *build_models(config), config)


def build_fake_bundle(root: Path, *, judge: bool = True) -> Path:
    """Write a fake bundle into ``root``: every model the bundle layout names, tiny and random."""
    from idcraft.checkpoints import save_checkpoint
    from idcraft.tiny import random_adapter, tiny_image_encoder
    from idcraft.world import bundle
    from idcraft.world.arrays import render_arrays
    from idcraft.world.judge import train_judge

    pipe = _sd_pipeline()
    pipe.save_pretrained(root / bundle.SD)
    encoder = tiny_image_encoder()
    encoder.save_pretrained(root / bundle.IMAGE_ENCODER)
    for k, method in enumerate(("ip-adapter", "ip-adapter-plus", "faceid", "instantid")):
        adapter = random_adapter(pipe.unet, method, encoder, seed=k)
        path = root / bundle.ADAPTERS[method]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(adapter.to_checkpoint(), path)
    _identitynet(pipe.unet).save_pretrained(root / bundle.IDENTITYNET)
    _identity_models(root / bundle.IDENTITY)
    if judge:
        arrays = render_arrays(48, seed=3, ids=range(96), workers=1)
        tiny = {"stem": 8, "channels": [8, 8, 8], "hidden": 16}
        train_judge(
            arrays, root / bundle.JUDGE, steps=2, batch_size=16, config=tiny, references=False, progress=False
        )
    return root


@pytest.fixture(scope="session")
def fake_bundle(tmp_path_factory) -> Path:
    """A fake bundle shared by the tests of a session (building it takes a few seconds)."""
    return build_fake_bundle(tmp_path_factory.mktemp("bundle"))
