"""The miniature SD1.5 trainers: a factor-4 VAE whose scaling factor whitens its latents, and a text encoder
+ UNet trained jointly whose saved folder is a StableDiffusionPipeline that loads and draws 64x64 images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from idcraft.world.arrays import render_arrays
from idcraft.world.trainers.text_unet import character_weights, finetune_unet, sample_grid, train_text_unet
from idcraft.world.trainers.vae import finetune_decoder, random_crops, train_vae

TINY_VAE = {"block_out_channels": (8, 16, 16), "norm_num_groups": 8, "eval_samples": 16, "warmup_steps": 5}
TINY_SD = {
    "text_hidden_size": 32,
    "text_num_hidden_layers": 1,
    "text_intermediate_size": 64,
    "block_out_channels": (16, 32, 32),
    "attention_head_dim": (2, 2, 2),
    "warmup_steps": 5,
}


@pytest.fixture(scope="module")
def data():
    arrays = render_arrays(160, seed=11, ids=range(96), workers=1)
    return arrays.subset(slice(0, 128)), arrays.subset(slice(128, 160))


@pytest.fixture(scope="module")
def vae_run(data, tmp_path_factory):
    train, held_out = data
    out = tmp_path_factory.mktemp("vae")
    result = train_vae(
        train,
        out,
        steps=40,
        batch_size=16,
        learning_rate=2e-3,
        config=TINY_VAE,
        progress=False,
        eval_arrays=held_out,
    )
    return out, result


def test_vae_learns_and_sets_scaling_factor(vae_run, data):
    from diffusers import AutoencoderKL

    out, result = vae_run
    assert result["final_loss"] < 0.8 * result["initial_loss"]
    vae = AutoencoderKL.from_pretrained(str(out)).eval()
    assert vae.config.scaling_factor == pytest.approx(result["scaling_factor"])
    assert vae.config.scaling_factor == pytest.approx(1 / result["latent_std"])
    x = torch.from_numpy(data[1].images[:4]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(torch.Generator().manual_seed(0)) * vae.config.scaling_factor
        y = vae.decode(z / vae.config.scaling_factor).sample
    assert posterior.mean.shape == (4, 4, 16, 16)  # factor 4, four latent channels
    assert y.shape == x.shape
    assert 0.5 < float(z.std()) < 2.0  # the scaling factor brings latents near unit variance
    assert result["psnr"] > 8 and np.isfinite(result["psnr_face"])


def test_vae_is_deterministic_for_a_seed(data, tmp_path):
    kwargs = {"steps": 3, "batch_size": 8, "config": TINY_VAE, "progress": False, "eval_arrays": data[1]}
    a = train_vae(data[0], tmp_path / "a", seed=5, **kwargs)
    b = train_vae(data[0], tmp_path / "b", seed=5, **kwargs)
    assert a["final_loss"] == b["final_loss"] and a["scaling_factor"] == b["scaling_factor"]
    assert (tmp_path / "a" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        tmp_path / "b" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()


def test_face_crops_contain_the_face(data):
    train, _ = data
    images = torch.from_numpy(train.images[:8])
    boxes = torch.from_numpy(train.face_bbox[:8])
    crops = random_crops(images, boxes, 32, 1.0, torch.Generator().manual_seed(0))
    assert crops.shape == (8, 32, 32, 3)
    whole = random_crops(images, boxes, 0, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(whole, images)


def test_text_unet_trains_and_saves_a_loadable_pipeline(vae_run, data, tmp_path):
    from diffusers import StableDiffusionPipeline

    from idcraft.world.tokenizer import clip_tokenizer

    vae_dir, vae_result = vae_run
    train, held_out = data
    out = tmp_path / "sd"
    result = train_text_unet(
        train,
        vae_dir,
        out,
        steps=30,
        batch_size=16,
        learning_rate=2e-3,
        config=TINY_SD,
        progress=False,
        eval_arrays=held_out,
    )
    assert result["eval_loss_caption"] < 0.9 * result["initial_eval"]["eval_loss_caption"]
    assert result["vae_scaling_factor"] == pytest.approx(vae_result["scaling_factor"])
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]

    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert pipe.vae.config.scaling_factor == pytest.approx(vae_result["scaling_factor"])
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    attn2 = [name for name in pipe.unet.attn_processors if name.endswith("attn2.processor")]
    assert len(attn2) == len([n for n in pipe.unet.attn_processors if n.endswith("attn1.processor")]) > 0
    prompt = "a small red round creature standing on the left on a beach"
    expected = clip_tokenizer()(prompt, padding="max_length", max_length=77).input_ids
    assert pipe.tokenizer(prompt, padding="max_length", max_length=77).input_ids == expected
    assert pipe.tokenizer.model_max_length == 77

    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        prompt, height=64, width=64, num_inference_steps=3, generator=torch.Generator().manual_seed(0)
    )
    assert image.images[0].size == (64, 64)
    sheet = sample_grid(
        pipe, [prompt, "a big creature in the snow", ""], seed=1, num_inference_steps=2, scale=2
    )
    assert sheet.width == 3 * 128 and sheet.height > 128
    assert np.asarray(sheet)[:128].std() > 0


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f.name: load_file(str(f)) for f in sorted(folder.glob("*.safetensors"))}


def test_decoder_finetuning_keeps_the_latent_space_and_sharpens(vae_run, data, tmp_path):
    vae_dir, vae_result = vae_run
    train, held_out = data
    out = tmp_path / "vae"
    result = finetune_decoder(
        train, vae_dir, out, steps=30, batch_size=16, learning_rate=2e-3, progress=False, eval_arrays=held_out
    )
    assert result["psnr"] > result["psnr_before"] == pytest.approx(vae_result["psnr"])
    before, after = _weights(vae_dir), _weights(out)
    (name,) = before
    for key, value in before[name].items():
        same = torch.equal(value, after[name][key])
        assert same == (not key.startswith(("decoder.", "post_quant_conv."))), key
    from diffusers import AutoencoderKL

    assert AutoencoderKL.from_pretrained(str(out)).config.scaling_factor == pytest.approx(
        vae_result["scaling_factor"]
    )


def test_character_weights_cover_the_character_and_more_its_face(data):
    train, _ = data
    w = character_weights(train.subset(slice(0, 4)), 16, character=2.0, face=3.0)
    assert w.shape == (4, 1, 16, 16) and set(torch.unique(w).tolist()) <= {1.0, 3.0, 6.0}
    for k in range(4):
        x0, y0, x1, y1 = (train.face_bbox[k] / 4).tolist()
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        assert w[k, 0, cy, cx] == 6.0 and w[k, 0].min() == 1.0


def test_unet_detail_finetuning_trains_only_the_unet(vae_run, data, tmp_path):
    vae_dir, _ = vae_run
    train, held_out = data
    base = tmp_path / "sd"
    kwargs = {"batch_size": 16, "progress": False, "eval_arrays": held_out}
    train_text_unet(train, vae_dir, base, steps=3, learning_rate=2e-3, config=TINY_SD, **kwargs)
    out = tmp_path / "detail"
    result = finetune_unet(train, base, out, steps=20, learning_rate=2e-3, **kwargs)
    assert result["final_eval"]["eval_loss_caption"] < result["initial_eval"]["eval_loss_caption"]
    for part in ("text_encoder", "vae"):
        assert _weights(base / part).keys() == _weights(out / part).keys()
        for name, tensors in _weights(base / part).items():
            assert all(torch.equal(v, _weights(out / part)[name][k]) for k, v in tensors.items()), part
    unet_before, unet_after = _weights(base / "unet"), _weights(out / "unet")
    (name,) = unet_before
    assert any(not torch.equal(v, unet_after[name][k]) for k, v in unet_before[name].items())
