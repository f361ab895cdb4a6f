"""What a training step of the offline world's UNet costs, per UNet size and precision, relative to the
shipped UNet in float32 measured in the same run.

    python benchmarks/world_unet_step.py                       # batch 64 (text_unet's), 3 rounds
    python benchmarks/world_unet_step.py --batch 32 --rounds 5
    python benchmarks/world_unet_step.py --compile             # also torch.compile'd UNets (slow to start)

Why: on two CPU cores the world's base model (``text_unet`` + ``unet_detail``) is most of a rebuild's time,
and the base is what limits identity transfer there (it draws characters as blobs). A bigger UNet is only
worth trying if a step stays affordable; this says how much a step of each candidate costs, and whether
bfloat16 autocast (``torch.autocast("cpu", torch.bfloat16)``, float32 master weights, as ``idcraft train
--mixed-precision bf16`` runs on a CPU) buys that back on this machine.

A step = UNet forward on noisy 4x16x16 latents with a 77x64 text context, MSE to the noise, backward,
AdamW. ``--compile`` adds ``torch.compile``'d UNets (inductor's C++ kernels on a CPU). Rounds interleave
every configuration (A B C ... A B C ...) after one warm-up step each; reported: median seconds per step,
its ratio to the shipped UNet's float32 step, and the parameter count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from idcraft.world.trainers.text_unet import DEFAULT_CONFIG, build_unet

#: Candidate UNets: the shipped one and wider / deeper ones at the 16x16 level, where faces are drawn.
CANDIDATES = {
    "shipped (32,64,128) x1": {},
    "wide (64,128,128) x1": {"block_out_channels": (64, 128, 128), "attention_head_dim": (4, 8, 8)},
    "wide (64,128,128) x2": {
        "block_out_channels": (64, 128, 128),
        "attention_head_dim": (4, 8, 8),
        "layers_per_block": 2,
    },
}


def make_step(unet, batch: int, bf16: bool):
    """A closure running one training step of ``unet`` on random inputs of batch ``batch``."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    latents, noise = torch.randn(2, batch, 4, 16, 16)
    context = torch.randn(batch, 77, DEFAULT_CONFIG["text_hidden_size"])
    timesteps = torch.randint(0, 1000, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            pred = unet(latents, timesteps, encoder_hidden_states=context).sample
        loss = (pred.float() - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd UNets")
    args = parser.parse_args()

    torch.manual_seed(0)
    runs = {}
    for name, overrides in CANDIDATES.items():
        unet = build_unet({**DEFAULT_CONFIG, **overrides}).train()
        params = sum(p.numel() for p in unet.parameters())
        variants = [("fp32", unet, False), ("bf16", unet, True)]
        if args.compile:
            variants += [
                ("fp32+compile", torch.compile(unet), False),
                ("bf16+compile", torch.compile(unet), True),
            ]
        for label, model, bf16 in variants:
            step = make_step(model, args.batch, bf16)
            step()  # warm-up: allocations, oneDNN kernel selection, compilation
            runs[(name, label)] = (step, params, [])
    for _ in range(args.rounds):
        for step, _, times in runs.values():
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            times.append((time.perf_counter() - started) / args.steps)

    baseline = statistics.median(runs[(next(iter(CANDIDATES)), "fp32")][2])
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'unet':<26} {'variant':<13} {'params':>8} {'s/step':>7} {'ratio':>6}")
    for (name, label), (_, params, times) in runs.items():
        seconds = statistics.median(times)
        print(f"{name:<26} {label:<13} {params / 1e6:>7.1f}M {seconds:>7.3f} {seconds / baseline:>6.2f}")


if __name__ == "__main__":
    main()
