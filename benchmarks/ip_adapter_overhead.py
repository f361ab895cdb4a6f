"""Per-step cost of the IP-Adapter on an SD1.5-shaped UNet, as a ratio to the bare UNet in the same run.

    python benchmarks/ip_adapter_overhead.py                 # SD1.5 shapes (860M UNet, 64x64 latents)
    python benchmarks/ip_adapter_overhead.py --unet ci       # CI-sized UNet, same structure (fast)
    python benchmarks/ip_adapter_overhead.py --tokens 16     # Plus-sized token count

Random weights (compute does not depend on values). Both variants share one UNet in one process and run
interleaved A B B A ... after a warm-up, so drift on a noisy machine hits both alike; the ratio of the
medians is reported, with the min-max range. Batch 2 = one classifier-free-guidance step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from idcraft.adapter import IPAdapter

CONFIGS = {
    # diffusers' defaults are SD1.5's block layout; only the text width differs.
    "sd15": dict(cross_attention_dim=768, sample_size=64),
    "ci": dict(cross_attention_dim=384, block_out_channels=(128, 256, 512, 512), sample_size=32),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--unet", choices=CONFIGS, default="sd15")
    parser.add_argument("--tokens", type=int, default=4, help="image tokens (4 = IP-Adapter, 16 = Plus)")
    parser.add_argument("--rounds", type=int, default=6, help="A/B pairs timed")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[args.unet]).eval().to(dtype=dtype)
    cross = unet.config.cross_attention_dim
    size = unet.config.sample_size
    adapter = IPAdapter.for_unet(unet, "ip-adapter", image_embed_dim=1024, num_tokens=args.tokens).to(dtype)
    latents = torch.randn(2, 4, size, size, dtype=dtype)
    text = torch.randn(2, 77, cross, dtype=dtype)
    image_tokens = torch.randn(2, args.tokens, cross, dtype=dtype)
    t = torch.tensor([500])

    with_tokens = torch.cat([text, image_tokens], 1)
    adapter.layout.num_tokens = args.tokens

    def bare() -> None:
        unet(latents, t, encoder_hidden_states=text)

    def with_adapter() -> None:
        unet(latents, t, encoder_hidden_states=with_tokens)

    def timed(fn) -> float:
        """One UNet call; attaching/detaching the processors happens outside the timed region."""
        if fn is with_adapter:
            adapter.attach(unet)
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        elapsed = time.perf_counter() - start
        adapter.detach()
        return elapsed

    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(
        f"UNet {args.unet}: {params:.1f}M params, latents {size}x{size}, batch 2, {args.dtype}, "
        f"{args.tokens} image tokens, {args.threads} threads"
    )
    timed(bare), timed(with_adapter)  # warm-up
    a, b = [], []
    for i in range(args.rounds):
        order = (bare, with_adapter) if i % 2 == 0 else (with_adapter, bare)
        for fn in order:
            (a if fn is bare else b).append(timed(fn))
    ma, mb = statistics.median(a), statistics.median(b)
    paired = sorted(y / x for x, y in zip(a, b, strict=True))  # back-to-back pairs cancel slow drift
    ratio = statistics.median(paired)
    print(f"bare UNet step:    median {ma:.3f} s (min {min(a):.3f}, max {max(a):.3f})")
    print(f"with IP-Adapter:   median {mb:.3f} s (min {min(b):.3f}, max {max(b):.3f})")
    print(
        f"ratio (adapter / bare), median of {len(paired)} back-to-back pairs: {ratio:.3f} "
        f"({(ratio - 1) * 100:+.1f} %; pairs range {paired[0]:.3f}-{paired[-1]:.3f})"
    )


if __name__ == "__main__":
    main()
