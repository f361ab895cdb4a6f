"""The identity cache: a known reference skips the encoders; what changes encoding changes the key."""

from __future__ import annotations

import pytest
import torch

from idcraft.serve.cache import LRUStore, identity_key, nbytes

from .conftest import STEPS


@pytest.fixture
def encoder_calls(world, monkeypatch):
    """Calls of the image encoder / face analysis, per method (counted at each pipeline's encoder)."""
    calls = {m: 0 for m in world.methods}
    for method in world.methods:
        pipe = world.pipeline(method)
        real = pipe.encode_references

        def counting(*args, _real=real, _method=method, **kwargs):
            calls[_method] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(pipe, "encode_references", counting)
    return calls


def test_second_prompt_on_a_known_reference_calls_no_encoder(client, references, encoder_calls):
    def generate(**extra):
        body = {"prompt": "a portrait in a garden", "references": [references[0]], "steps": STEPS, **extra}
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    first = generate(seed=1)
    assert first["cache"] == "miss" and first["timings"]["encode_s"] > 0
    assert encoder_calls["ip-adapter"] == 1
    # a new prompt, seed, scale, size or step count reuses the identity: no encoder call, zero encoder time
    for extra in ({"prompt": "a portrait at the beach", "seed": 2}, {"scale": 0.5}, {"steps": 1}, {"n": 2}):
        again = generate(**extra)
        assert again["cache"] == "hit" and again["timings"]["encode_s"] == 0.0
    assert encoder_calls["ip-adapter"] == 1
    # another method encodes the same picture its own way
    assert generate(method="faceid")["cache"] == "miss"
    # and what changes a face method's encoding (which face) is part of the key: face_index 0 (the
    # largest of several) is not "left out" (the photo must show one face)
    assert generate(method="faceid", face_index=0)["cache"] == "miss"
    assert generate(method="faceid", face_index=0)["cache"] == "hit"
    assert encoder_calls == {"ip-adapter": 1, "ip-adapter-plus": 0, "faceid": 2, "instantid": 0}
    metrics = client.get("/metrics").text
    assert "idcraft_identity_cache_hits_total 5" in metrics
    assert "idcraft_identity_cache_misses_total 3" in metrics
    assert "idcraft_encode_calls_total 3" in metrics


def test_identity_key_reads_what_changes_encoding():
    base = identity_key("faceid", ["a"])
    assert base == identity_key("faceid", ["a"], s_scale=1, face_index=None, multi_person=False)
    others = {
        identity_key("faceid-plusv2", ["a"]),
        identity_key("faceid", ["b"]),
        identity_key("faceid", ["a", "a"]),
        identity_key("faceid", ["a"], s_scale=0.5),
        identity_key("faceid", ["a"], face_index=0),
        identity_key("faceid", ["a"], face_index=1),
        identity_key("faceid", ["a"], multi_person=True),
    }
    assert base not in others and len(others) == 7
    assert identity_key("x", ["a", "b"]) != identity_key("x", ["b", "a"])  # order places the tokens


def test_lru_bounds_by_entries_and_bytes_and_keeps_pinned():
    store = LRUStore(max_entries=2, max_bytes=100)
    store.put("a", b"x" * 10)
    store.put("b", b"x" * 10)
    assert store.get("a") is not None  # "a" is now the most recent
    store.put("c", b"x" * 10)
    assert "b" not in store and "a" in store and "c" in store
    store.put("big", b"x" * 90)  # over the byte bound with the others: the oldest go
    assert "big" in store and store.bytes <= 100
    assert not store.put("huge", b"x" * 101) and "huge" not in store
    pinned = LRUStore(max_entries=1, max_bytes=10)
    pinned.put("p", b"x" * 50, pin=True)
    pinned.put("q", b"x")
    assert "p" in pinned


def test_nbytes_counts_tensor_storage():
    from idcraft.conditioning import ReferenceTokens

    tokens = ReferenceTokens(torch.zeros(1, 4, 8), torch.zeros(1, 4, 8))
    assert 2 * 4 * 4 * 8 <= nbytes(tokens) < 2 * 4 * 4 * 8 + 1024
