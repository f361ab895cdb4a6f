"""The FaceID family on tiny models: tokens, normalisation, LoRA, diffusers agreement, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idcraft.checkpoints import save_checkpoint
from idcraft.cli import main
from idcraft.conditioning import Identity, identity_tokens
from idcraft.errors import FaceError, IdcraftError
from idcraft.pipeline import IPAdapterPipeline
from idcraft.tiny import random_adapter

SETTINGS = dict(steps=2, guidance=5.0, width=64, height=64, seed=3, progress=False)
RNG = np.random.default_rng(0)


def _embedding(scale: float = 20.0) -> np.ndarray:
    return (RNG.standard_normal(512) * scale).astype(np.float32)  # raw ArcFace norms are ~20


def _arr(images) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def test_faceid_normalises_the_raw_embedding(sd15):
    adapter = random_adapter(sd15.unet, "faceid")
    e = _embedding()
    a = identity_tokens(adapter, [Identity(e)])
    b = identity_tokens(adapter, [Identity(e * 3.7)])
    assert a.cond.shape == (1, 4, 32)
    assert torch.allclose(a.cond, b.cond, atol=1e-5)
    zeros = adapter.project(torch.zeros(1, 512))
    assert torch.allclose(a.uncond, zeros, atol=1e-6)


def test_several_photos_of_one_person_are_averaged(sd15):
    adapter = random_adapter(sd15.unet, "faceid")
    e1, e2 = _embedding(), _embedding(5.0)
    both = identity_tokens(adapter, [Identity(e1), Identity(e2)])
    unit = [v / np.linalg.norm(v) for v in (e1, e2)]
    mean = (unit[0] + unit[1]) / 2
    assert torch.allclose(both.cond, identity_tokens(adapter, [Identity(mean)]).cond, atol=1e-5)


@pytest.mark.parametrize("count", [1, 2, 5])
def test_portrait_gives_16_tokens_per_photo(sd15, count):
    adapter = random_adapter(sd15.unet, "faceid-portrait")
    embeddings = [_embedding() for _ in range(count)]
    tokens = identity_tokens(adapter, [Identity(e) for e in embeddings])
    assert tokens.cond.shape == (1, 16 * count, 32) and tokens.uncond.shape == tokens.cond.shape
    first = identity_tokens(adapter, [Identity(embeddings[0])])
    assert torch.allclose(tokens.cond[:, :16], first.cond, atol=1e-5)


def _plain(sd15) -> np.ndarray:
    sd15.set_progress_bar_config(disable=True)
    return _arr(
        sd15(
            "a cat",
            negative_prompt="",
            num_inference_steps=2,
            guidance_scale=5.0,
            width=64,
            height=64,
            generator=torch.Generator("cpu").manual_seed(3),
        ).images
    )


def test_faceid_lora_reaches_every_attention_layer(sd15, reference_image):
    from idcraft.injection import AdapterRouter, IPAttnProcessor

    adapter = random_adapter(sd15.unet, "faceid")
    with torch.no_grad():
        for proc in adapter.layers.values():  # LoRA off (up = 0) and scale 0: exactly the base model
            for name in ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"):
                getattr(proc, name).up.weight.zero_()
    pipe = IPAdapterPipeline(sd15, adapter)
    routers = list(sd15.unet.attn_processors.values())
    assert all(isinstance(r, AdapterRouter) and len(r) == 1 for r in routers)
    processors = [next(iter(r.routes.values())) for r in routers]
    assert all(isinstance(p, IPAttnProcessor) and p.lora_rank for p in processors)
    assert sum(p.has_image for p in processors) == len(processors) // 2
    off = _arr(pipe("a cat", face_embedding=_embedding(), scale=0.0, **SETTINGS))
    adapter.detach()
    assert np.array_equal(off, _plain(sd15))


def test_merged_lora_gives_the_unmerged_image_and_restores_the_weights(sd15):
    """Alone on its base, FaceID's LoRA is merged into the attention weights (a step then costs what the
    base's does); the image is the one the LoRA computed on the fly gives, and detaching restores every
    weight bit for bit. A second adapter on the same base unmerges it."""
    before = {k: v.clone() for k, v in sd15.unet.state_dict().items()}
    plain = _plain(sd15)
    adapter = random_adapter(sd15.unet, "faceid")
    pipe = IPAdapterPipeline(sd15, adapter)
    assert all(p.lora_merged for p in adapter.layers.values())
    face = _embedding()
    merged = _arr(pipe("a cat", face_embedding=face, **SETTINGS))
    other = IPAdapterPipeline(sd15, random_adapter(sd15.unet, "faceid-portrait", seed=1))
    assert not any(p.lora_merged for p in adapter.layers.values())  # not alone any more: on the fly
    on_the_fly = _arr(pipe("a cat", face_embedding=face, **SETTINGS))
    assert np.abs(merged.astype(int) - on_the_fly).max() <= 1
    assert not np.array_equal(merged, plain)
    other.adapter.detach()
    adapter.detach()
    after = sd15.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert np.array_equal(_plain(sd15), plain)


@pytest.mark.parametrize("method", ["faceid", "faceid-portrait"])
def test_saved_faceid_runs_the_same_in_diffusers(sd15, tmp_path, method):
    adapter = random_adapter(sd15.unet, method, seed=5)
    save_checkpoint(adapter.to_checkpoint(), tmp_path / "adapter.bin")
    e = _embedding()
    ours = _arr(
        IPAdapterPipeline(sd15, adapter)(
            "a cat", face_embedding=e, negative_prompt="blurry", scale=0.8, **SETTINGS
        )
    )
    adapter.detach()
    sd15.load_ip_adapter(str(tmp_path), subfolder="", weight_name="adapter.bin", image_encoder_folder=None)
    sd15.set_ip_adapter_scale(0.8)
    unit = torch.nn.functional.normalize(torch.tensor(e), dim=0)[None, None]
    theirs = _arr(
        sd15(
            "a cat",
            negative_prompt="blurry",
            ip_adapter_image_embeds=[torch.cat([torch.zeros_like(unit), unit])],
            num_inference_steps=2,
            guidance_scale=5.0,
            width=64,
            height=64,
            generator=torch.Generator("cpu").manual_seed(3),
        ).images
    )
    assert np.abs(ours - theirs).max() <= 2


def test_faceid_plus_reads_the_aligned_face(sd15, encoder):
    from PIL import Image

    from idcraft.conditioning import faceid_plus_crop

    photo = Image.open("tests/data/grace_hopper.jpg").convert("RGB")
    pytest.importorskip("dlib")
    from idcraft.faces import analyse_reference

    face = analyse_reference(photo, "default", embed=False)
    crop = faceid_plus_crop(photo, face.kps)
    assert crop.size == (224, 224)
    v1 = random_adapter(sd15.unet, "faceid-plus", encoder.model)
    e = _embedding()
    tokens = identity_tokens(v1, [Identity(e, crop)], encoder)
    flipped = identity_tokens(v1, [Identity(e, crop.transpose(0))], encoder)
    assert tokens.cond.shape == (1, 4, 32)
    assert not torch.allclose(tokens.cond, flipped.cond, atol=1e-4), "the crop's CLIP features matter"

    v2 = random_adapter(sd15.unet, "faceid-plusv2", encoder.model)
    id_only = v2.image_proj.norm(
        v2.image_proj.proj(torch.nn.functional.normalize(torch.tensor(e), dim=0)).reshape(1, 4, 32)
    )
    assert torch.allclose(
        identity_tokens(v2, [Identity(e, crop)], encoder, s_scale=0.0).cond, id_only, atol=1e-5
    )
    assert not torch.allclose(
        identity_tokens(v2, [Identity(e, crop)], encoder, s_scale=1.0).cond, id_only, atol=1e-3
    )


def test_non_arcface_embeddings_are_refused(sd15, tmp_path):
    pipe = IPAdapterPipeline(sd15, random_adapter(sd15.unet, "faceid"))
    with pytest.raises(FaceError, match="512-value ArcFace embedding, got 128.*dlib"):
        pipe("a cat", face_embedding=np.ones(128, np.float32), **SETTINGS)
    with pytest.raises(IdcraftError, match="needs reference photos or --face-embedding"):
        pipe("a cat", **SETTINGS)


@pytest.fixture
def faceid_files(tmp_path, sd15):
    sd15.save_pretrained(tmp_path / "base")
    save_checkpoint(
        random_adapter(sd15.unet, "faceid").to_checkpoint(), tmp_path / "ip-adapter-faceid_tiny.bin"
    )
    np.save(tmp_path / "face.npy", _embedding())
    return tmp_path


def test_cli_faceid_from_a_saved_embedding(faceid_files, capsys):
    d = faceid_files
    common = [
        "generate",
        "--base",
        str(d / "base"),
        "--adapter",
        str(d / "ip-adapter-faceid_tiny.bin"),
        "--prompt",
        "a portrait",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--device",
        "cpu",
    ]
    assert main(common + ["--face-embedding", str(d / "face.npy"), "--output", str(d / "out.png")]) == 0
    assert (d / "out.png").exists()
    np.save(d / "dlib.npy", np.ones(128, np.float32))
    assert main(common + ["--face-embedding", str(d / "dlib.npy"), "--output", str(d / "bad.png")]) == 2
    assert "ArcFace" in capsys.readouterr().err and not (d / "bad.png").exists()


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_faceid_plusv2_end_to_end_from_photo_and_embedding(request, base, encoder):
    pytest.importorskip("dlib")
    pipe_base = request.getfixturevalue(base)
    adapter = random_adapter(pipe_base.unet, "faceid-plusv2", encoder.model)
    pipe = IPAdapterPipeline(pipe_base, adapter, encoder)
    photo = "tests/data/grace_hopper.jpg"
    e = _embedding()
    one = _arr(pipe("a portrait", photo, face_embedding=e, s_scale=1.0, **SETTINGS))
    structure_off = _arr(pipe("a portrait", photo, face_embedding=e, s_scale=0.0, **SETTINGS))
    assert one.shape == (1, 64, 64, 3)
    assert np.abs(one - structure_off).mean() > 0.2, "--s-scale weighs the CLIP face structure"
