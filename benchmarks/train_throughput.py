"""Adapter training throughput: samples/s per method, and the cost of a training step relative to the
bare UNet's forward + backward, measured in the same run.

    python benchmarks/train_throughput.py                    # tiny models (all methods) + SD1.5-shaped UNet
    python benchmarks/train_throughput.py --unet ci          # a smaller UNet of the same structure (fast)
    python benchmarks/train_throughput.py --skip-tiny --methods ip-adapter-plus

Two parts:

1. ``idcraft.training.train`` end to end on the tiny random-weight SD1.5 models (data loading, VAE, text
   and CLIP encoders, UNet + adapter, AdamW): samples/s per method, first step (warm-up) excluded.
2. On an SD1.5-shaped UNet (random weights; compute does not depend on values), per method:
   *adapter step* = projection of ViT-H-shaped features + UNet with decoupled cross-attention, backward
   into the adapter, AdamW step (what one training step costs beyond the frozen encoders), against
   *bare step* = the same UNet with text tokens only, forward + backward to its input latents (the
   gradient has to cross the whole UNet in both). Interleaved A B B A ... after a warm-up; the ratio of
   medians is reported with the min-max range. Batch 1, 64x64 latents (512 px) for ``sd15``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from idcraft.adapter import IPAdapter
from idcraft.registry import get_method
from idcraft.training.ip_adapter import AdapterDenoiser

METHODS = ("ip-adapter", "ip-adapter-plus", "ip-adapter-full-face")
CONFIGS = {
    "sd15": dict(cross_attention_dim=768, sample_size=64),
    "ci": dict(cross_attention_dim=384, block_out_channels=(128, 256, 512, 512), sample_size=32),
}
#: ViT-H/14 widths: pooled projection, and (patch tokens + CLS, hidden size) of the penultimate layer.
VIT_H = {"pooled": (1024,), "penultimate": (257, 1280)}


def tiny_throughput(methods: list[str], steps: int) -> None:
    from idcraft.tiny import tiny_image_encoder, tiny_sd15_pipeline
    from idcraft.training import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny_sd15_pipeline().save_pretrained(root / "base")
        tiny_image_encoder().save_pretrained(root / "encoder")
        rng = np.random.default_rng(0)
        (root / "data").mkdir()
        for i in range(16):
            Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(
                root / "data" / f"{i}.png"
            )
            (root / "data" / f"{i}.txt").write_text(f"image {i}")
        print(f"tiny SD1.5 models, 32 px, batch 4, {steps} steps (first excluded), end to end:")
        for method in methods:
            times: list[float] = []
            last = [0.0]

            def clock(info, times=times, last=last):
                now = time.perf_counter()
                if info.step > 1:
                    times.append(now - last[0])
                last[0] = now

            cfg = TrainConfig(
                method=method,
                base=str(root / "base"),
                image_encoder=str(root / "encoder"),
                data=str(root / "data"),
                output=str(root / method),
                resolution=32,
                batch_size=4,
                max_steps=steps,
                progress=False,
                tensorboard=False,
                checkpoint_every=10_000,
            )
            Trainer(cfg, callbacks=[clock]).run()
            per_step = statistics.median(times)
            print(f"  {method:22s} {4 / per_step:8.1f} samples/s   ({per_step * 1000:.0f} ms/step)")


def unet_ratio(unet_kind: str, methods: list[str], rounds: int) -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[unet_kind]).eval().requires_grad_(False)
    cross = unet.config.cross_attention_dim
    size = unet.config.sample_size
    latents = torch.randn(1, 4, size, size)
    text = torch.randn(1, 77, cross)
    t = torch.tensor([500])
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(
        f"\nUNet {unet_kind}: {params:.0f}M params, latents {size}x{size}, batch 1, float32, "
        f"{torch.get_num_threads()} threads"
    )

    def bare() -> None:
        x = latents.clone().requires_grad_(True)
        unet(x, t, encoder_hidden_states=text).sample.square().mean().backward()

    for name in methods:
        method = get_method(name)
        shape = VIT_H[method.feature]
        adapter = IPAdapter.for_unet(unet, method, shape[-1]).requires_grad_(True)
        model = AdapterDenoiser(unet, adapter)
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4, weight_decay=0.01)
        features = torch.randn(1, *shape)

        def step(model=model, optimizer=optimizer, features=features) -> None:
            model(latents, t, text, features).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def timed(fn, adapter=adapter, step=step) -> float:
            """Attach only around the adapter step: the bare step must run the UNet's own processors."""
            if fn is step:
                adapter.attach(unet)
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            adapter.detach()
            return elapsed

        timed(bare), timed(step)  # warm-up
        a, b = [], []
        for i in range(rounds):
            for fn in (bare, step) if i % 2 == 0 else (step, bare):
                (a if fn is bare else b).append(timed(fn))
        ma, mb = statistics.median(a), statistics.median(b)
        trainable = sum(p.numel() for p in adapter.parameters()) / 1e6
        print(
            f"  {name:22s} adapter step {mb:7.2f} s ({1 / mb:6.2f} samples/s, {trainable:.0f}M trainable) | "
            f"bare step {ma:7.2f} s | ratio {mb / ma:.3f} (range {min(b) / max(a):.3f}-{max(b) / min(a):.3f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--unet", choices=CONFIGS, default="sd15")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=2, help="A/B pairs timed per method on the big UNet")
    parser.add_argument("--tiny-steps", type=int, default=12)
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_tiny:
        tiny_throughput(args.methods, args.tiny_steps)
    if not args.skip_unet:
        unet_ratio(args.unet, args.methods, args.rounds)


if __name__ == "__main__":
    main()
