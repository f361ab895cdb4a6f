"""PuLID's ID attention on a tiny SDXL UNet: release numbering, per-call state, ortho rules."""

from __future__ import annotations

import threading

import pytest
import torch

from idcraft.errors import CheckpointError
from idcraft.pulid.sdxl import IDAttention, IdCall, combine, id_call
from idcraft.tiny import tiny_sd15_unet, tiny_sdxl_unet


@pytest.fixture(scope="module")
def unet():
    unet = tiny_sdxl_unet()
    torch.manual_seed(1)
    attention = IDAttention(unet, id_dim=24)
    with torch.no_grad():
        for p in attention.parameters():
            p.normal_(0, 0.5)
    attention.attach(unet)
    return unet, attention


def run(unet, call=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 7, 64, generator=g)
    cond = {
        "text_embeds": torch.randn(1, 32, generator=g),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    }
    with torch.no_grad(), id_call(call):
        return unet(x, 10, encoder_hidden_states=text, added_cond_kwargs=cond).sample


def test_release_numbering_and_round_trip(unet):
    unet, attention = unet
    sd = attention.release_state_dict()
    indices = sorted({int(k.split(".")[1]) for k in sd})
    assert indices and all(i % 2 == 1 for i in indices)  # attn2 layers: odd in attn_processors order
    loaded = IDAttention.from_release(tiny_sdxl_unet(), sd | {"id_adapter.latents": torch.zeros(1)})
    assert all(torch.equal(loaded.release_state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(CheckpointError, match="another base model"):
        IDAttention.from_release(tiny_sd15_unet(cross_attention_dim=64), sd)


def test_no_call_and_scale_zero_are_the_base_model(unet):
    unet, _ = unet
    tokens = torch.randn(1, 6, 24)
    base = run(unet)
    assert torch.equal(run(unet, IdCall(tokens, scale=0.0)), base)
    for ortho in ("off", "v1", "v2"):
        assert (run(unet, IdCall(tokens, scale=1.0, ortho=ortho)) - base).abs().max() > 1e-3


def test_zero_tokens_and_modes_change_the_output(unet):
    unet, _ = unet
    tokens = torch.randn(1, 6, 24)
    outs = [
        run(unet, IdCall(tokens, 1.0, nz, o)) for nz, o in ((0, "v2"), (20, "v2"), (20, "v1"), (20, "off"))
    ]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert (outs[i] - outs[j]).abs().max() > 1e-4


def test_v1_adds_only_the_part_orthogonal_to_text():
    text, ident = torch.randn(2, 9, 5), torch.randn(2, 9, 5)
    added = combine(text, ident, 1.0, "v1") - text
    assert torch.allclose((added * text).sum(dim=-2), torch.zeros(2, 5), atol=1e-5)
    # v2 with all attention mass on the first tokens (m = 1) adds the ID output unchanged
    assert torch.allclose(combine(text, ident, 0.5, "v2", torch.ones(2, 9, 1)), text + 0.5 * ident)


def test_threads_each_see_their_own_tokens(unet):
    unet, _ = unet
    calls = [IdCall(torch.randn(1, 6, 24), scale=s) for s in (0.5, 1.5)]
    alone = [run(unet, c, seed=i) for i, c in enumerate(calls)]
    results: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(2)

    def work(i):
        barrier.wait()
        for _ in range(3):
            results[i] = run(unet, calls[i], seed=i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert torch.allclose(results[i], alone[i], atol=1e-6)
