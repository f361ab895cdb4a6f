"""The world trainers' fast path (what runs on a GPU: bfloat16 autocast, data and draws on the device, fused
AdamW, losses read every N steps, a time cap), run here on the CPU with ``fast=True``: every trainer trains,
saves a model its usual loader reads, and reports where and why its loop stopped. The CPU path itself is
unchanged (tests/world/test_trainers_base.py and friends)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from idcraft.world.arrays import render_arrays
from idcraft.world.identity import held_out_ids, train_ids
from idcraft.world.trainers.steps import FastLoop, use_fast_path

TINY_VAE = {"block_out_channels": (8, 16, 16), "norm_num_groups": 8, "eval_samples": 16, "warmup_steps": 2}
TINY_SD = {
    "text_hidden_size": 32,
    "text_num_hidden_layers": 1,
    "text_intermediate_size": 64,
    "block_out_channels": (16, 32, 32),
    "attention_head_dim": (2, 2, 2),
    "warmup_steps": 2,
}
FAST = {"fast": True, "log_every": 2, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy models on one thread (two spin-wait on each other on a machine shared with other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    arrays = render_arrays(96, seed=11, ids=range(96), workers=1)
    return arrays.subset(slice(0, 80)), arrays.subset(slice(80, 96))


def _finite(values) -> bool:
    return len(values) > 0 and all(math.isfinite(v) for v in values)


def test_fast_path_is_on_for_cuda_only_unless_asked():
    assert use_fast_path("cuda") and use_fast_path("cuda:1")
    assert not use_fast_path("cpu") and use_fast_path("cpu", True) and not use_fast_path("cuda", False)


def test_fast_loop_batches_schedule_and_time_cap():
    loop = FastLoop("cpu", 10, seed=0, desc="t", batch_size=4, log_every=3, progress=False)
    batches = loop.batches(10)
    first_epoch = torch.cat([next(batches), next(batches)])
    assert len(set(first_epoch.tolist())) == 8  # a permutation walked in order, no repeats in an epoch
    model = torch.nn.Linear(2, 1)
    optimizer = loop.adamw(model.parameters(), lr=1.0)
    schedule = loop.schedule(optimizer, warmup=2)
    rates = []
    for step in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
        loop.record(step, torch.tensor(float(step)))
    assert rates[0] == pytest.approx(0.5) and rates[1] == pytest.approx(1.0, abs=0.05)
    assert rates[-1] < 0.05  # cosine to zero at the last step
    assert loop.finish() == [float(i) for i in range(10)]
    assert [line.split(" loss ")[1].split()[0] for line in loop.log] == [
        "1.0000",
        "4.0000",
        "7.0000",
        "9.0000",
    ]
    capped = FastLoop("cpu", 1000, seed=0, desc="t", batch_size=1, max_seconds=1e-6, progress=False)
    capped.start()
    assert capped.out_of_time() and capped.measurements()["stopped_by"] == "time"
    assert capped.progress_share(0) == 1.0  # the rate anneals on the time used


def test_vae_decoder_and_ceiling_on_the_fast_path(data, tmp_path):
    from diffusers import AutoencoderKL

    from idcraft.world.judge import train_judge
    from idcraft.world.trainers.vae import finetune_decoder, train_vae, vae_ceiling

    train, held_out = data
    cfg = {**TINY_VAE, "latent_channels": 8}
    result = train_vae(
        train, tmp_path / "vae", steps=6, batch_size=8, config=cfg, eval_arrays=held_out, **FAST
    )
    assert result["fast_path"] and result["steps_done"] == 6 and result["stopped_by"] == "steps"
    assert _finite(result["loss_curve"]) and result["samples_per_second"] > 0
    vae = AutoencoderKL.from_pretrained(str(tmp_path / "vae"))
    assert vae.config.latent_channels == 8
    capped = train_vae(
        train,
        tmp_path / "capped",
        steps=500,
        batch_size=8,
        config=cfg,
        eval_arrays=held_out,
        max_seconds=1e-3,
        **FAST,
    )
    assert capped["stopped_by"] == "time" and capped["steps_done"] < 500
    decoder = finetune_decoder(
        train, tmp_path / "vae", tmp_path / "vae2", steps=4, batch_size=8, eval_arrays=held_out, **FAST
    )
    assert decoder["steps_done"] == 4 and np.isfinite(decoder["psnr_face"])

    judge_dir = tmp_path / "judge"
    metrics = train_judge(
        train,
        judge_dir,
        held_out=held_out,
        steps=4,
        batch_size=16,
        config={"stem": 8, "channels": [8, 8, 8], "hidden": 16},
        references=False,
        **FAST,
    )
    assert metrics["fast_path"] and metrics["steps_done"] == 4 and np.isfinite(metrics["final_loss"])
    from idcraft.world.judge import Judge

    ceiling = vae_ceiling(vae.eval(), Judge.load(judge_dir), held_out)
    assert set(ceiling) == {"samples", "vae", "render", "psnr", "psnr_face"}
    assert 0 <= ceiling["vae"]["fine"] <= 1 and ceiling["samples"] == len(held_out)


def test_text_unet_and_detail_on_the_fast_path_follow_the_vae_channels(data, tmp_path):
    from diffusers import StableDiffusionPipeline

    from idcraft.world.trainers.text_unet import finetune_unet, train_text_unet
    from idcraft.world.trainers.vae import train_vae

    train, held_out = data
    vae_cfg = {**TINY_VAE, "latent_channels": 8}
    train_vae(
        train, tmp_path / "vae", steps=2, batch_size=8, config=vae_cfg, eval_arrays=held_out, progress=False
    )
    result = train_text_unet(
        train,
        tmp_path / "vae",
        tmp_path / "sd",
        steps=6,
        batch_size=8,
        config=TINY_SD,
        eval_arrays=held_out,
        **FAST,
    )
    assert result["steps_done"] == 6 and _finite(result["loss_curve"])
    detail = finetune_unet(
        train, tmp_path / "sd", tmp_path / "sd2", steps=4, batch_size=8, eval_arrays=held_out, **FAST
    )
    assert detail["steps_done"] == 4 and _finite(detail["loss_curve"])
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd2"))
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == 8
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red creature", height=64, width=64, num_inference_steps=2).images[0]
    assert image.size == (64, 64)


def test_encoders_on_the_fast_path(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from idcraft.world.face_backend import WorldFaceAnalyser
    from idcraft.world.trainers.clip_vision import DeviceGroupedBatches, content_labels, train_clip_vision
    from idcraft.world.trainers.identity import train_identity

    ids = train_ids()[::18][:48]
    train = render_arrays(96, seed=5, ids=ids, workers=1)
    held_out = render_arrays(32, seed=6, ids=held_out_ids(), workers=1)

    batches = DeviceGroupedBatches(content_labels(train), 16, 4, torch.Generator().manual_seed(0))
    index = batches()
    keys = content_labels(train)[index.numpy()][:, 1:3]
    assert len(index) == 16 and all((keys[g * 4 : g * 4 + 4] == keys[g * 4]).all() for g in range(4))

    clip_cfg = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "projection_dim": 24,
        "text_hidden_size": 32,
        "text_num_hidden_layers": 1,
        "text_num_attention_heads": 2,
        "text_intermediate_size": 64,
        "warmup_steps": 2,
        "group_size": 4,
    }
    clip = train_clip_vision(
        train, tmp_path / "clip", steps=4, batch_size=16, config=clip_cfg, eval_arrays=held_out, **FAST
    )
    assert clip["steps_done"] == 4 and np.isfinite(clip["final_loss"])
    CLIPVisionModelWithProjection.from_pretrained(str(tmp_path / "clip"))

    face_cfg = {
        "detector_widths": [8, 12, 16, 24],
        "recogniser_widths": [8, 12, 16, 24],
        "crop_width": 14,
        "crop_height": 20,
        "eval_negatives": 8,
    }
    identity = train_identity(
        train, tmp_path / "identity", steps=4, batch_size=32, config=face_cfg, eval_arrays=held_out, **FAST
    )
    assert identity["steps_done"] == 4 and np.isfinite(identity["recogniser_final_loss"])
    assert np.isfinite(identity["detector_final_train_kps_px"])
    WorldFaceAnalyser(tmp_path / "identity")


def test_the_fast_warp_matches_the_analysers():
    """The fast path's closed-form affine inverse warps crops as face_backend.warp_crops does."""
    from idcraft.world.face_backend import warp_crops
    from idcraft.world.trainers.identity import _random_similarity, _warp_on_device

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 64, 64, generator=generator)
    matrices = _random_similarity(6, generator, 1.0)
    expected = warp_crops(images, matrices, 28, 40, padding="border")
    assert torch.allclose(_warp_on_device(images, matrices, 28, 40, "border"), expected, atol=1e-4)
