"""Per-step cost of InstantCharacter over the bare FLUX transformer, as ratios measured in one run.

    python benchmarks/instantcharacter_overhead.py                    # 2 double + 4 single blocks, 256 image tokens
    python benchmarks/instantcharacter_overhead.py --image-tokens 1024 --dtype float32

A FLUX transformer at the real width (3072, 24 heads of 128, T5 width 4096) with reduced depth, and the
official-size projector (1.36B parameters: width 2688, 4 + 4 blocks, 1024 tokens), random weights
(compute does not depend on values). Timed:

* **step**: one transformer call, bare vs with the subject attention on every block (1024 subject
  tokens), interleaved A B B A ... after a warm-up so drift on a noisy machine hits both alike; the ratio
  of the medians is reported with the min-max range. The subject tokens are given: this is the cost of
  the attention branch alone;
* **resampler**: the part of the projector that depends on the timestep, run once per step by idcraft;
* **projector**: the whole projector, which the official pipeline re-runs at every step (idcraft runs its
  timestep-independent half once per reference).

Batch 1 (FLUX-dev: guidance embedding, no CFG batch), 512 text tokens (T5's padded length).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import FluxTransformer2DModel

from idcraft.instantcharacter.adapter import InstantCharacterAdapter
from idcraft.instantcharacter.processors import subject_call
from idcraft.instantcharacter.projector import ProjectorConfig

OFFICIAL = ProjectorConfig.official()
PATCHES = 729  # SigLIP / DINOv2 tokens per 384 view


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks (FLUX.1: 19)")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks (FLUX.1: 38)")
    parser.add_argument("--image-tokens", type=int, default=256, help="16 x 16 = a 256 x 256 image")
    parser.add_argument("--rounds", type=int, default=3, help="A/B pairs timed")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in the run's dtype: half the memory of float32 + cast
    try:
        transformer = FluxTransformer2DModel(
            num_layers=args.double, num_single_layers=args.single, guidance_embeds=True
        ).eval()
        adapter = InstantCharacterAdapter.for_transformer(transformer, OFFICIAL).eval()
    finally:
        torch.set_default_dtype(default)

    side = int(args.image_tokens**0.5)
    latents = torch.randn(1, args.image_tokens, 64, dtype=dtype)
    text = torch.randn(1, 512, 4096, dtype=dtype)
    img_ids = torch.zeros(args.image_tokens, 3)
    img_ids[:, 1] = torch.arange(args.image_tokens) // side
    img_ids[:, 2] = torch.arange(args.image_tokens) % side
    call = {
        "hidden_states": latents,
        "encoder_hidden_states": text,
        "pooled_projections": torch.randn(1, 768, dtype=dtype),
        "timestep": torch.tensor([0.5], dtype=dtype),
        "guidance": torch.tensor([3.5]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(512, 3),
        "return_dict": False,
    }
    features = [torch.randn(1, n * PATCHES, OFFICIAL.width, dtype=dtype) for n in (3, 1, 4)]
    t = torch.tensor([500.0], dtype=dtype)
    with torch.no_grad():
        prepared = adapter.projector.prepare(*features)

    def bare() -> float:
        return timed(lambda: transformer(**call))

    def with_subject() -> float:
        """Attaching and detaching happen outside the timed region; the step's subject tokens are
        already made (same ``t`` as the warm-up), so this times the attention branch alone."""
        adapter.attach(transformer)
        try:
            with subject_call(subject):
                return timed(lambda: transformer(**call))
        finally:
            adapter.detach()

    params = sum(p.numel() for p in transformer.parameters()) / 1e9
    extra = sum(p.numel() for p in adapter.layers.parameters()) / 1e9
    print(
        f"FLUX transformer {args.double} double + {args.single} single blocks ({params:.2f}B params) + subject "
        f"attention ({extra:.2f}B), {args.image_tokens} image + 512 text + 1024 subject tokens, batch 1, "
        f"{args.dtype}, {args.threads} threads"
    )
    subject = adapter.call(prepared, 0.8, lambda: t)
    with_subject(), bare()  # warm-up; the first also makes (and caches) the subject tokens for t
    a, b = [], []
    for i in range(args.rounds):
        for fn in (bare, with_subject) if i % 2 == 0 else (with_subject, bare):
            (a if fn is bare else b).append(fn())
    resampler = [timed(lambda: adapter.projector.tokens(prepared, t)) for _ in range(args.rounds)]
    whole = [timed(lambda: adapter.projector(*features, t)) for _ in range(max(1, args.rounds // 2))]

    bare_s, subject_s = statistics.median(a), statistics.median(b)
    lo, hi = min(b) / max(a), max(b) / min(a)
    res_s, whole_s = statistics.median(resampler), statistics.median(whole)
    print(f"bare step:            {spread(a)}")
    print(f"with subject attention: {spread(b)}  -> x{subject_s / bare_s:.3f} (range x{lo:.3f}-x{hi:.3f})")
    print(f"resampler per step:   {spread(resampler)}  = {100 * res_s / bare_s:.1f} % of a bare step")
    print(f"whole projector:      {spread(whole)}  = {100 * whole_s / bare_s:.1f} % of a bare step")
    print(
        f"per step, idcraft (attention + resampler): x{(subject_s + res_s) / bare_s:.3f}; "
        f"official (attention + whole projector every step): x{(subject_s + whole_s) / bare_s:.3f}"
    )


if __name__ == "__main__":
    main()
