"""Per-step cost of InstantID (16 face tokens in decoupled attention + IdentityNet) over the bare SDXL UNet.

    python benchmarks/instantid_overhead.py --unet ci        # SDXL structure at CI size (fast)
    python benchmarks/instantid_overhead.py --unet sdxl      # real SDXL shapes (2.6B UNet; slow on CPU)

Random weights. All variants share one UNet in one process and run interleaved after a warm-up; the ratio
of medians to the bare UNet step (batch 2 = one guidance step) is reported for: the adapter alone,
IdentityNet alone, and both (InstantID).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from idcraft.adapter import IPAdapter

SDXL = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CONFIGS = {
    "sdxl": SDXL,
    "ci": SDXL
    | dict(
        sample_size=32,
        block_out_channels=(128, 256, 512),
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 8),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--unet", choices=CONFIGS, default="ci")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[args.unet]).eval().to(dtype=dtype)
    identitynet = ControlNetModel.from_unet(unet).eval().to(dtype=dtype)
    adapter = IPAdapter.for_unet(unet, "instantid", image_embed_dim=512).to(dtype)
    size, cross = unet.config.sample_size, unet.config.cross_attention_dim
    latents = torch.randn(2, 4, size, size, dtype=dtype)
    text = torch.randn(2, 77, cross, dtype=dtype)
    faces = adapter.project(torch.randn(2, 512, dtype=dtype)).detach()
    added = {"text_embeds": torch.randn(2, 1280, dtype=dtype), "time_ids": torch.randn(2, 6, dtype=dtype)}
    kps_image = torch.rand(2, 3, size * 8, size * 8, dtype=dtype)
    t = torch.tensor([500])

    def step(with_adapter: bool, with_identitynet: bool) -> float:
        context = torch.cat([text, faces], 1) if with_adapter else text
        if with_adapter:
            adapter.attach(unet, [identitynet] if with_identitynet else [])
            adapter.layout.num_tokens = faces.shape[1]
        start = time.perf_counter()
        with torch.no_grad():
            residuals = {}
            if with_identitynet:
                down, mid = identitynet(
                    latents,
                    t,
                    context if with_adapter else faces,
                    kps_image,
                    added_cond_kwargs=added,
                    return_dict=False,
                )
                residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            unet(latents, t, encoder_hidden_states=context, added_cond_kwargs=added, **residuals)
        elapsed = time.perf_counter() - start
        adapter.detach()
        return elapsed

    variants = {
        "bare UNet": (False, False),
        "+ adapter (16 face tokens)": (True, False),
        "+ IdentityNet only": (False, True),
        "InstantID (both)": (True, True),
    }
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    cn_params = sum(p.numel() for p in identitynet.parameters()) / 1e6
    print(
        f"UNet {args.unet}: {params:.0f}M params, IdentityNet {cn_params:.0f}M, latents {size}x{size}, "
        f"batch 2, {args.dtype}, {args.threads} threads"
    )
    for flags in variants.values():
        step(*flags)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.rounds):
        order = list(variants.items()) if i % 2 == 0 else list(reversed(variants.items()))
        for name, flags in order:
            times[name].append(step(*flags))
    base = statistics.median(times["bare UNet"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:28s} median {median:7.3f} s  (min {min(values):.3f}, max {max(values):.3f})  "
            f"ratio {median / base:.3f}"
        )


if __name__ == "__main__":
    main()
