"""The subject attention on FLUX: every block gets it, where its query comes from, where its output goes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from idcraft.instantcharacter.processors import HeadRMSNorm, SubjectAttnProcessor, SubjectState


def test_every_block_gets_its_processor_in_official_order(flux, ic_adapter):
    transformer = flux.transformer
    before = dict(transformer.attn_processors)
    ic_adapter.attach(transformer)
    try:
        procs = transformer.attn_processors
        names = list(procs)
        assert len(procs) == len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
        assert all(isinstance(p, SubjectAttnProcessor) for p in procs.values())
        # checkpoint layer i = i-th entry of attn_processors: double-stream blocks first, then single-stream
        assert names[0].startswith("transformer_blocks.0.") and names[1].startswith(
            "single_transformer_blocks.0."
        )
        assert [procs[n] for n in names] == [ic_adapter.layers[str(i)] for i in range(len(names))]
    finally:
        ic_adapter.detach()
    assert all(transformer.attn_processors[n] is p for n, p in before.items())


def test_head_rmsnorm_is_the_checkpoints_variant():
    norm = HeadRMSNorm(16)
    with torch.no_grad():
        norm.scale.copy_(torch.linspace(0.5, 2, 16))
    x = torch.randn(2, 3, 16)
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(norm(x), norm.scale * x / (rms + 1e-6))


def _layer(seed: int = 0):
    state = SubjectState(scale=0.7, text_len=5)
    proc = SubjectAttnProcessor(32, 32, 16, state)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in proc.parameters():
            p.normal_()
    state.tokens = torch.randn(1, 6, 32)
    return proc, state


def _expected_subject(proc, attn, img_hidden):
    """The subject branch from its definition: the layer's raw image queries (no norm_q, no RoPE)."""

    def heads(x):
        return x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)

    q = proc.norm_ip_q(heads(attn.to_q(img_hidden)))
    k = proc.norm_ip_k(heads(proc.to_k_ip(proc.state.tokens)))
    v = heads(proc.to_v_ip(proc.state.tokens))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(img_hidden.shape[0], img_hidden.shape[1], -1)


def _rope(length: int):
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    pos = torch.arange(length, dtype=torch.float64)
    return get_1d_rotary_pos_embed(
        16, pos, repeat_interleave_real=True, use_real=True, freqs_dtype=torch.float64
    )


@pytest.mark.parametrize("kind", ["double", "single"])
def test_subject_branch_query_and_placement(flux, kind):
    transformer = flux.transformer
    blocks = transformer.transformer_blocks if kind == "double" else transformer.single_transformer_blocks
    attn = blocks[0].attn
    proc, state = _layer()
    base = FluxAttnProcessor()
    torch.manual_seed(1)
    text, image = torch.randn(1, 5, 32), torch.randn(1, 9, 32)
    rope = _rope(14)
    # double-stream: (image, text) separately; single-stream: [text; image] as one sequence
    args = (image, text, None, rope) if kind == "double" else (torch.cat([text, image], 1), None, None, rope)
    with torch.no_grad():
        want, got = base(attn, *args), proc(attn, *args)
        subject = 0.7 * _expected_subject(proc, attn, image)
        if kind == "double":
            assert torch.equal(got[1], want[1])  # text tokens untouched
            # added before to_out: to_out(h + s ip) = to_out(h) + s W_out ip
            torch.testing.assert_close(
                got[0], want[0] + subject @ attn.to_out[0].weight.T, rtol=1e-4, atol=1e-4
            )
        else:
            assert torch.equal(got[:, :5], want[:, :5])  # text positions untouched
            torch.testing.assert_close(got[:, 5:], want[:, 5:] + subject, rtol=1e-4, atol=1e-4)
        state.scale = 0.0  # off: exactly diffusers' processor
        off = proc(attn, *args)
    for a, b in zip(*(x if kind == "double" else (x,) for x in (off, want)), strict=True):
        assert torch.equal(a, b)
