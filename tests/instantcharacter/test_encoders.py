"""The reference as the official pipeline sees it: views, tile order, processors, layer indices, shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from idcraft.errors import IdcraftError
from idcraft.instantcharacter.encoders import (
    DINOV2_LAYERS,
    HIGH_RES,
    LOW_RES,
    SIGLIP_LAYERS,
    SubjectEncoder,
    subject_views,
)
from idcraft.instantcharacter.tiny import tiny_dinov2, tiny_siglip

P = 64  # tiny encoders: 384 / 48 = 8 x 8 patch tokens per view
W = 128  # 64 (SigLIP) + 64 (DINOv2)


def test_official_constants():
    assert SIGLIP_LAYERS == (7, 13, 26) and DINOV2_LAYERS == (9, 19, 29)
    assert (LOW_RES, HIGH_RES) == (384, 768)


def test_views_stretch_to_square_and_tile_row_by_row():
    # 200 x 100: left half red, right half blue; after stretching to 200 x 200 the top-left tile is red,
    # top-right blue, and the bottom row repeats them (a stretch, not a pad: no border colour appears).
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :100] = (255, 0, 0)
    img[:, 100:] = (0, 0, 255)
    low, tiles = subject_views(Image.fromarray(img))
    assert low.size == (LOW_RES, LOW_RES) and [t.size for t in tiles] == [(LOW_RES, LOW_RES)] * 4
    colours = [tuple(np.asarray(t)[100:280, 100:280].mean((0, 1)).round()) for t in tiles]
    assert colours == [(255, 0, 0), (0, 0, 255), (255, 0, 0), (0, 0, 255)]
    # Top and bottom tiles differ where the image does: a vertical gradient.
    grad = np.repeat(np.linspace(0, 255, 100, dtype=np.uint8)[:, None, None], 100, 1).repeat(3, 2)
    _, tiles = subject_views(Image.fromarray(grad))
    means = [np.asarray(t).mean() for t in tiles]
    assert means[0] == pytest.approx(means[1]) and means[2] > means[0] + 100


def test_processors_normalise_as_the_official_ones(subject_encoder):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (LOW_RES, LOW_RES, 3), dtype=np.uint8))
    x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float() / 255
    siglip = subject_encoder.siglip_processor(images=[img], return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(siglip, (x - 0.5) / 0.5)
    dino = subject_encoder.dinov2_processor(
        images=[img],
        size={"shortest_edge": 384},
        crop_size={"height": 384, "width": 384},
        return_tensors="pt",
    ).pixel_values[0]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(dino, (x - mean) / std)


def _layer_outputs(layers, indices):
    """Forward hooks recording the output of encoder layer i-1 for each hidden-state index i."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in indices}
    handles = [
        layers[i - 1].register_forward_hook(
            lambda m, a, out, i=i: seen[i].append(out[0] if isinstance(out, tuple) else out)
        )
        for i in indices
    ]
    return seen, handles


def test_features_layers_tiles_and_shapes(subject_encoder, subject_image):
    enc = subject_encoder
    s_seen, hs = _layer_outputs(enc.siglip.encoder.layers, SIGLIP_LAYERS)
    d_seen, hd = _layer_outputs(enc.dinov2.encoder.layer, DINOV2_LAYERS)
    try:
        f = enc.encode(subject_image)
    finally:
        for h in hs + hd:
            h.remove()
    assert f.low_res_shallow.shape == (1, 3 * P, W)
    assert f.low_res_deep.shape == (1, P, W)
    assert f.high_res_deep.shape == (1, 4 * P, W)
    # Shallow: the low-res pass (first call of each hook), three layers one after the other along tokens;
    # SigLIP in the first 64 channels, DINOv2 (class token dropped) in the last 64.
    for n, i in enumerate(SIGLIP_LAYERS):
        assert torch.equal(f.low_res_shallow[:, n * P : (n + 1) * P, :64], s_seen[i][0])
    for n, i in enumerate(DINOV2_LAYERS):
        assert torch.equal(f.low_res_shallow[:, n * P : (n + 1) * P, 64:], d_seen[i][0][:, 1:])

    low, tiles = subject_views(subject_image)
    with torch.no_grad():
        pix = enc.siglip_processor(images=[low, *tiles], return_tensors="pt").pixel_values
        siglip = enc.siglip(pix).last_hidden_state  # includes SigLIP's final LayerNorm
        dpix = enc.dinov2_processor(
            images=[low, *tiles],
            size={"shortest_edge": 384},
            crop_size={"height": 384, "width": 384},
            return_tensors="pt",
        ).pixel_values
        dino = enc.dinov2(dpix).last_hidden_state[:, 1:]
    torch.testing.assert_close(f.low_res_deep, torch.cat([siglip[:1], dino[:1]], 2))
    for t in range(4):  # tile t's tokens are block t of the high-res sequence (TL, TR, BL, BR)
        block = f.high_res_deep[0, t * P : (t + 1) * P]
        torch.testing.assert_close(block, torch.cat([siglip[1 + t], dino[1 + t]], -1))


def test_rgba_reference_is_composited_on_white(subject_encoder):
    rgba = np.zeros((64, 64, 4), np.uint8)  # fully transparent
    white = np.full((64, 64, 3), 255, np.uint8)
    a = subject_encoder.encode(Image.fromarray(rgba, "RGBA"))
    b = subject_encoder.encode(Image.fromarray(white))
    assert torch.equal(a.low_res_deep, b.low_res_deep)


def test_too_shallow_encoder_is_refused():
    with pytest.raises(IdcraftError, match=r"has 12 layers.*after layers 7, 13, 26"):
        SubjectEncoder(tiny_siglip(layers=12), tiny_dinov2())
