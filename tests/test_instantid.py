"""InstantID on tiny SDXL: face tokens in the UNet, IdentityNet sees the face tokens and the keypoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from idcraft.checkpoints import save_checkpoint
from idcraft.cli import main
from idcraft.conditioning import Identity, identity_tokens
from idcraft.errors import IdcraftError
from idcraft.pipeline import IPAdapterPipeline
from idcraft.registry import detect_method
from idcraft.tiny import random_adapter, tiny_controlnet

KPS = np.array([[20, 24], [44, 24], [32, 36], [22, 48], [42, 48]], np.float32)
SETTINGS = dict(steps=2, guidance=5.0, width=64, height=64, seed=5, progress=False)


def _embedding(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(512) * 20).astype(np.float32)


@pytest.fixture
def instantid(sdxl):
    adapter = random_adapter(sdxl.unet, "instantid")
    identitynet = tiny_controlnet(sdxl.unet)
    return IPAdapterPipeline(sdxl, adapter, controlnet=identitynet), adapter, identitynet


def test_file_is_detected_as_instantid(sdxl):
    ckpt = random_adapter(sdxl.unet, "instantid").to_checkpoint()
    assert detect_method(ckpt.image_proj, ckpt.ip_adapter).name == "instantid"


def test_raw_embedding_is_used_unnormalised(sdxl):
    adapter = random_adapter(sdxl.unet, "instantid")
    e = _embedding()
    a, b = identity_tokens(adapter, [Identity(e)]), identity_tokens(adapter, [Identity(2 * e)])
    assert a.cond.shape == (1, 16, 64)
    assert not torch.allclose(a.cond, b.cond, atol=1e-3), (
        "InstantID feeds the raw embedding: its norm matters"
    )
    assert torch.allclose(a.uncond, adapter.project(torch.zeros(1, 512)), atol=1e-6)


def test_identitynet_sees_the_face_tokens_not_the_text(instantid):
    pipe, adapter, identitynet = instantid
    tokens = identity_tokens(adapter, [Identity(_embedding())])
    adapter.layout.num_tokens = tokens.num_tokens
    text = torch.randn(1, 77, 64)
    sample, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.rand(1, 3, 16, 16)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.zeros(1, 6)}
    ours = identitynet(
        sample, t, torch.cat([text, tokens.cond], 1), cond, added_cond_kwargs=added, return_dict=False
    )
    other_text = identitynet(
        sample, t, torch.cat([text * 0, tokens.cond], 1), cond, added_cond_kwargs=added, return_dict=False
    )
    for a, b in zip([*ours[0], ours[1]], [*other_text[0], other_text[1]], strict=True):
        assert torch.equal(a, b), "the text must not reach IdentityNet"
    other_face = identitynet(
        sample, t, torch.cat([text, tokens.cond.flip(1)], 1), cond, added_cond_kwargs=added, return_dict=False
    )
    assert not torch.allclose(ours[1], other_face[1]), "the face tokens are IdentityNet's context"


def test_generation_uses_keypoints_and_scales(instantid):
    pipe, _, _ = instantid
    e = _embedding()
    base = np.asarray(pipe("a portrait", face_embedding=e, keypoints=KPS, **SETTINGS)[0], np.int16)
    moved = np.asarray(pipe("a portrait", face_embedding=e, keypoints=KPS + 10, **SETTINGS)[0], np.int16)
    other = np.asarray(
        pipe("a portrait", face_embedding=_embedding(1), keypoints=KPS, **SETTINGS)[0], np.int16
    )
    no_cn = np.asarray(
        pipe("a portrait", face_embedding=e, keypoints=KPS, controlnet_scale=0.0, **SETTINGS)[0], np.int16
    )
    assert np.abs(base - moved).mean() > 0.5, "IdentityNet reads the keypoints"
    assert np.abs(base - other).mean() > 0.5, "the identity matters"
    assert np.abs(base - no_cn).mean() > 0.5, "--controlnet-scale reaches IdentityNet"


def test_instantid_needs_identitynet_and_keypoints(sdxl):
    adapter = random_adapter(sdxl.unet, "instantid")
    with pytest.raises(IdcraftError, match="needs its IdentityNet: pass --controlnet"):
        IPAdapterPipeline(sdxl, adapter)
    pipe = IPAdapterPipeline(sdxl, adapter, controlnet=tiny_controlnet(sdxl.unet))
    with pytest.raises(IdcraftError, match="where the face goes"):
        pipe("a portrait", face_embedding=_embedding(), **SETTINGS)


def test_cli_instantid(tmp_path, sdxl, capsys):
    sdxl.save_pretrained(tmp_path / "base")
    tiny_controlnet(sdxl.unet).save_pretrained(tmp_path / "ControlNetModel")
    save_checkpoint(random_adapter(sdxl.unet, "instantid").to_checkpoint(), tmp_path / "ip-adapter.bin")
    np.save(tmp_path / "face.npy", _embedding())
    (tmp_path / "kps.json").write_text(json.dumps(KPS.tolist()))
    args = [
        "generate",
        "--base",
        str(tmp_path / "base"),
        "--adapter",
        str(tmp_path / "ip-adapter.bin"),
        "--face-embedding",
        str(tmp_path / "face.npy"),
        "--keypoints",
        str(tmp_path / "kps.json"),
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
        "--scale",
        "0.8",
        "--controlnet-scale",
        "0.8",
    ]
    assert (
        main([*args, "--controlnet", str(tmp_path / "ControlNetModel"), "--output", str(tmp_path / "o.png")])
        == 0
    )
    assert Image.open(tmp_path / "o.png").size == (64, 64)
    assert main([*args, "--output", str(tmp_path / "bad.png")]) == 2
    assert "IdentityNet" in capsys.readouterr().err


def test_regions_partition_the_canvas_and_faces_are_placed_side_by_side():
    from idcraft.multiperson import place_faces, region_masks

    placed = place_faces([KPS, KPS], [(64, 64), (64, 64)], (128, 64))
    assert placed[0][:, 0].max() < 64 <= placed[1][:, 0].min()
    masks = region_masks(placed, (128, 64), (8, 16))
    assert torch.equal(masks[0] + masks[1], torch.ones(8, 16))
    assert masks[0][:, :8].all() and not masks[0][:, 8:].any()


def test_each_region_attends_only_to_its_own_person():
    from diffusers.models.attention_processor import Attention

    from idcraft.injection import IPAttnProcessor, Region, TokenLayout

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    layout = TokenLayout(num_tokens=8)
    proc = IPAttnProcessor(16, 8, layout)
    left = torch.zeros(4, 8)
    left[:, :4] = 1
    layout.regions = [Region(0, 4, left), Region(4, 8, 1 - left)]
    hidden = torch.randn(1, 32, 16)  # a 4x8 grid of positions
    text = torch.randn(1, 5, 8)
    person_a, person_b = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    out = proc(attn, hidden, torch.cat([text, person_a, person_b], 1))
    out_b_changed = proc(attn, hidden, torch.cat([text, person_a, torch.randn(1, 4, 8)], 1))
    is_left = left.reshape(-1).bool()
    assert torch.equal(out[0, is_left], out_b_changed[0, is_left]), "person B must not reach A's region"
    assert not torch.allclose(out[0, ~is_left], out_b_changed[0, ~is_left])


def test_two_people_with_instantid(instantid):
    pipe, adapter, _ = instantid
    tokens = identity_tokens(adapter, [Identity(_embedding(0)), Identity(_embedding(1))], per_person=True)
    assert tokens.num_tokens == 32
    two = np.stack([KPS * [0.5, 1], KPS * [0.5, 1] + [64, 0]])
    image = pipe("two people", tokens=tokens, keypoints=two, **(SETTINGS | {"width": 128}))[0]
    assert image.size == (128, 64)
    assert adapter.layout.regions is None, "regions are cleared after the call"


def test_resampler_runs_once_on_zeros_then_embedding(sdxl):
    """InstantID's pipeline projects ``cat([zeros_like(emb), emb])`` in one Resampler call and splits it;
    batched and separate calls differ in the last bits (float32 CPU: ~3e-6), so the tokens must be the
    batched call's exactly."""
    adapter = random_adapter(sdxl.unet, "instantid")
    e = _embedding()
    tokens = identity_tokens(adapter, [Identity(e)])
    vector = torch.as_tensor(e)[None]
    both = adapter.project(torch.cat([torch.zeros_like(vector), vector]))
    assert torch.equal(tokens.uncond, both[:1]) and torch.equal(tokens.cond, both[1:])
