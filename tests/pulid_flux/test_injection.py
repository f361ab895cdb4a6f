"""The ID cross-attention and its placement on diffusers' FLUX blocks: the official formula, the official
injection points and count, exact base output outside an identity call, one call per context."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from idcraft.errors import CheckpointError, IncompatibleAdapterError
from idcraft.instantcharacter.tiny import tiny_flux_transformer
from idcraft.pulid.flux import IdCrossAttention, PulidFluxInjection, id_call, injection_points


def _official_formula(ca: IdCrossAttention, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """PerceiverAttentionCA.forward written out (LN both, q from the image, k/v from the ID tokens only)."""
    x, latents = ca.norm1(x), ca.norm2(latents)
    b, n, _ = latents.shape
    q = ca.to_q(latents).view(b, n, ca.heads, -1).transpose(1, 2)
    k, v = ca.to_kv(x).chunk(2, dim=-1)
    k = k.view(x.shape[0], x.shape[1], ca.heads, -1).transpose(1, 2)
    v = v.view(x.shape[0], x.shape[1], ca.heads, -1).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(ca.head_dim), dim=-1)
    return ca.to_out((w @ v).transpose(1, 2).reshape(b, n, -1))


def test_cross_attention_is_the_official_formula():
    torch.manual_seed(0)
    ca = IdCrossAttention(width=48, id_width=20, inner=2 * 128)
    ids, image = torch.randn(1, 32, 20), torch.randn(2, 50, 48)
    assert ca.heads == 2
    assert torch.allclose(ca(ids, image), _official_formula(ca, ids, image), atol=1e-5)


def test_injection_points_match_the_official_count():
    points = injection_points(19, 38)
    assert len(points) == 19 // 2 + 38 // 4 + 1 + 1 == 20
    assert points[:3] == [("double", 0), ("double", 2), ("double", 4)]
    assert points[10:12] == [("single", 0), ("single", 4)] and points[-1] == ("single", 36)


def _tokens(batch=1, width=24):
    return torch.randn(batch, 32, width, generator=torch.Generator().manual_seed(1))


def _inputs(transformer, batch=1):
    g = torch.Generator().manual_seed(2)
    c = transformer.config
    img = torch.randn(batch, 16, c.in_channels, generator=g)
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return dict(
        hidden_states=img,
        encoder_hidden_states=torch.randn(batch, 5, c.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
        timestep=torch.full((batch,), 0.7),
        guidance=torch.full((batch,), 4.0),
        img_ids=ids,
        txt_ids=torch.zeros(5, 3),
        return_dict=False,
    )


@pytest.fixture()
def attached():
    transformer = tiny_flux_transformer(double=3, single=5)
    injection = PulidFluxInjection.for_transformer(transformer, id_width=24, heads=1)
    with torch.no_grad():
        for p in injection.parameters():
            p.normal_(0, 0.3)
    injection.attach(transformer)
    yield transformer, injection
    injection.detach()


@torch.no_grad()
def test_identity_acts_only_inside_its_call(attached):
    transformer, injection = attached
    assert len(injection.ca) == 4  # doubles 0, 2; singles 0, 4
    inputs = _inputs(transformer)
    base = transformer(**inputs)[0]
    with id_call(injection.call(_tokens(), 1.0)):
        with_id = transformer(**inputs)[0]
    with id_call(injection.call(_tokens(), 0.0)):
        assert torch.equal(transformer(**inputs)[0], base)
    with id_call(injection.call(None, 1.0)):
        assert torch.equal(transformer(**inputs)[0], base)
    other = PulidFluxInjection.for_transformer(transformer, id_width=24, heads=1)
    with id_call(other.call(_tokens(), 1.0)):  # another injection's call is not ours
        assert torch.equal(transformer(**inputs)[0], base)
    assert (with_id - base).abs().mean() > 1e-3
    injection.detach()
    assert torch.equal(transformer(**inputs)[0], base)


def test_checks_against_the_transformer():
    transformer = tiny_flux_transformer(double=3, single=5)
    injection = PulidFluxInjection.for_transformer(transformer, id_width=24, heads=1)
    with pytest.raises(IncompatibleAdapterError, match="2 injection points"):
        injection.check_compatible(tiny_flux_transformer(double=1, single=2))
    wider = tiny_flux_transformer(double=3, single=5)
    wider.config.num_attention_heads = 4  # as a meta model of another width would say
    with pytest.raises(IncompatibleAdapterError, match="width"):
        injection.check_compatible(wider)
    with pytest.raises(IncompatibleAdapterError, match="not a FLUX transformer"):
        injection.check_compatible(torch.nn.Linear(2, 2))


def test_release_layout_round_trip_and_bad_keys():
    transformer = tiny_flux_transformer(double=3, single=5)
    injection = PulidFluxInjection.for_transformer(transformer, id_width=24, heads=1)
    state = injection.ca.state_dict()
    loaded = PulidFluxInjection.from_state_dict(dict(state))
    assert len(loaded.ca) == 4 and loaded.id_width == 24 and loaded.width == 32
    for key, value in loaded.ca.state_dict().items():
        assert torch.equal(value, state[key])
    with pytest.raises(CheckpointError, match="unexpected key"):
        PulidFluxInjection.from_state_dict({**state, "0.to_k.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="numbered"):
        PulidFluxInjection.from_state_dict({k.replace("3.", "7.", 1): v for k, v in state.items()})


@torch.no_grad()
def test_two_threads_each_see_their_own_call(attached):
    transformer, injection = attached
    inputs = _inputs(transformer)
    alone = {}
    for weight in (0.5, 1.5):
        with id_call(injection.call(_tokens(), weight)):
            alone[weight] = transformer(**inputs)[0]
    results, barrier = {}, threading.Barrier(2)

    def run(weight):
        barrier.wait()
        with id_call(injection.call(_tokens(), weight)):
            for _ in range(3):
                results[weight] = transformer(**inputs)[0]

    threads = [threading.Thread(target=run, args=(w,)) for w in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for weight, expected in alone.items():
        assert torch.equal(results[weight], expected)
