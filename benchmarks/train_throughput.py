"""Adapter training throughput: samples/s per method, and the cost of a training step relative to the
bare base model's forward + backward, measured in the same run.

    python benchmarks/train_throughput.py                    # tiny models (all methods) + SD1.5-shaped UNet
    python benchmarks/train_throughput.py --unet ci          # a smaller UNet of the same structure (fast)
    python benchmarks/train_throughput.py --skip-tiny --methods ip-adapter-plus faceid instantcharacter

Two parts:

1. ``idcraft.training.train`` end to end on tiny random-weight models (data loading, VAE, text and image
   encoders, denoiser + adapter, AdamW): samples/s per method, first step (warm-up) excluded. SD1.5 for
   the IP-Adapter and FaceID families, SDXL for InstantID, FLUX for InstantCharacter. The face methods
   read precomputed ArcFace-sized embeddings and keypoints from the manifest, so no face models are
   needed (the large-dataset path: faces analysed once, offline).
2. Per method, *adapter step* = what the method adds to a training step: projection of encoder-shaped
   features (ViT-H widths for CLIP, 512 for identity embeddings), the denoiser with the adapter's attention
   (and FaceID's LoRA, InstantID's IdentityNet), backward into everything that trains, AdamW step;
   against *bare step* = the same denoiser alone, forward + backward to its input latents (the gradient
   has to cross the whole denoiser in both). Interleaved A B B A ... after a warm-up; reported: the median
   of the back-to-back pairs' ratios, with their range. Batch 1. The UNet methods run on an SD1.5-shaped UNet
   (``--unet sd15``: 64x64 latents, 512 px; InstantID, an SDXL method, on the same UNet, so its ratio is
   IdentityNet + adapter over that UNet); InstantCharacter on a reduced FLUX transformer (``--flux``:
   FLUX's block structure at a smaller width and depth, and a proportionally reduced projector), random
   weights (compute does not depend on values).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from idcraft.adapter import IPAdapter
from idcraft.registry import get_method

IP_METHODS = ("ip-adapter", "ip-adapter-plus", "ip-adapter-full-face")
FACE_METHODS = ("faceid", "faceid-plusv2", "instantid")
METHODS = (*IP_METHODS, *FACE_METHODS, "instantcharacter")
CONFIGS = {
    "sd15": dict(cross_attention_dim=768, sample_size=64),
    "ci": dict(cross_attention_dim=384, block_out_channels=(128, 256, 512, 512), sample_size=32),
}
#: Reduced FLUX transformers: FLUX.1's block structure (double- then single-stream, guidance embedding,
#: 3-axis RoPE, 64 packed latent channels), width and depth cut to time on a CPU. FLUX.1 itself is 3072 wide
#: (24 heads of 128), 19 + 38 blocks, 4096-wide T5 context.
FLUX_CONFIGS = {
    "ci": dict(num_layers=1, num_single_layers=2, attention_head_dim=64, num_attention_heads=8),
    "wide": dict(num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=24),
}
#: ViT-H/14 widths: pooled projection, and (patch tokens + CLS, hidden size) of the penultimate layer.
VIT_H = {"pooled": (1024,), "penultimate": (257, 1280)}
KPS = [[10.0, 12.0], [22.0, 12.0], [16.0, 18.0], [11.0, 24.0], [21.0, 24.0]]
TINY_BATCH = 4


# ---------------------------------------------------------------------------- part 1: tiny, end to end
def _tiny_models(root: Path, methods: list[str]) -> dict[str, str]:
    from idcraft.tiny import tiny_image_encoder, tiny_sd15_pipeline, tiny_sdxl_pipeline

    paths = {"sd15": root / "sd15", "sdxl": root / "sdxl", "encoder": root / "encoder"}
    tiny_sd15_pipeline().save_pretrained(paths["sd15"])
    tiny_image_encoder().save_pretrained(paths["encoder"])
    if "instantid" in methods:
        tiny_sdxl_pipeline().save_pretrained(paths["sdxl"])
    if "instantcharacter" in methods:
        from idcraft.instantcharacter.tiny import save_tiny_encoders, tiny_flux_pipeline

        tiny_flux_pipeline().save_pretrained(root / "flux")
        paths["flux"] = root / "flux"
        paths["siglip"], paths["dinov2"] = save_tiny_encoders(root)
    return {k: str(v) for k, v in paths.items()}


def _tiny_data(root: Path) -> tuple[Path, Path]:
    """16 images with captions (a folder), and a manifest of the same images with precomputed
    embeddings and keypoints for the face methods."""
    rng = np.random.default_rng(0)
    folder = root / "data"
    folder.mkdir()
    lines = []
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"image {i}")
        np.save(folder / f"{i}.npy", (rng.standard_normal(512) * 20).astype(np.float32))
        kps = (np.array(KPS) + i % 4).tolist()
        lines.append({"image": f"{i}.png", "text": f"image {i}", "embedding": f"{i}.npy", "kps": kps})
    manifest = folder / "faces.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder, manifest


def tiny_throughput(methods: list[str], steps: int) -> None:
    from idcraft.training import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = _tiny_models(root, methods)
        folder, manifest = _tiny_data(root)
        print(f"tiny models, 32 px, batch {TINY_BATCH}, {steps} steps (first excluded), end to end:")
        for method in methods:
            settings: dict = dict(base=models["sd15"], image_encoder=models["encoder"], data=str(folder))
            if method in FACE_METHODS:
                settings.update(data=str(manifest), lora_rank=128)
            if method == "instantid":
                settings.update(base=models["sdxl"])
            if method == "instantcharacter":
                from idcraft.instantcharacter.tiny import tiny_projector_config

                projector = dataclasses.asdict(tiny_projector_config())
                projector.pop("width"), projector.pop("output_width")
                settings.update(
                    base=models["flux"],
                    image_encoder=models["siglip"],
                    image_encoder_2=models["dinov2"],
                    extra={"max_sequence_length": 16, "projector": projector},
                )
            times: list[float] = []
            last = [0.0]

            def clock(info, times=times, last=last):
                now = time.perf_counter()
                if info.step > 1:
                    times.append(now - last[0])
                last[0] = now

            cfg = TrainConfig(
                method=method,
                output=str(root / "runs" / method),
                resolution=32,
                batch_size=TINY_BATCH,
                max_steps=steps,
                progress=False,
                tensorboard=False,
                checkpoint_every=10_000,
                **settings,
            )
            Trainer(cfg, callbacks=[clock]).run()
            per_step = statistics.median(times)
            print(f"  {method:22s} {TINY_BATCH / per_step:8.1f} samples/s   ({per_step * 1000:.0f} ms/step)")


# ---------------------------------------------------------------------------- part 2: ratios
def _interleaved(bare: Callable[[], None], step: Callable[[], None], rounds: int) -> tuple[list, list]:
    """Times of ``bare`` and ``step`` after one warm-up each, in A B B A ... order."""

    def timed(fn: Callable[[], None]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    timed(bare), timed(step)
    a, b = [], []
    for i in range(rounds):
        for fn in (bare, step) if i % 2 == 0 else (step, bare):
            (a if fn is bare else b).append(timed(fn))
    return a, b


def _report(name: str, a: list[float], b: list[float], trainable: float) -> None:
    """Medians of both, and the median of the back-to-back pairs' ratios (robust to the drift of a shared
    machine, which moves both members of a pair alike) with their range."""
    ma, mb = statistics.median(a), statistics.median(b)
    ratios = [y / x for x, y in zip(a, b, strict=True)]
    print(
        f"  {name:22s} adapter step {mb:7.2f} s ({1 / mb:6.2f} samples/s, {trainable:.0f}M trainable) | "
        f"bare step {ma:7.2f} s | ratio {statistics.median(ratios):.3f} "
        f"(pairs {min(ratios):.3f}-{max(ratios):.3f})",
        flush=True,
    )


def _unet_model(name: str, unet: torch.nn.Module) -> tuple[torch.nn.Module, list, object, list]:
    """The training denoiser of ``name`` around ``unet``, as the recipe builds it: (model, trainable
    parameters, the condition its forward takes, the ControlNets the adapter attaches to)."""
    from diffusers import ControlNetModel

    from idcraft.training.faceid import FaceIDDenoiser
    from idcraft.training.instantid import IdentityNetDenoiser
    from idcraft.training.ip_adapter import AdapterDenoiser

    method = get_method(name)
    size = unet.config.sample_size
    if name in IP_METHODS:
        shape = VIT_H[method.feature]
        adapter = IPAdapter.for_unet(unet, method, shape[-1]).requires_grad_(True)
        features = torch.randn(1, *shape)
        return AdapterDenoiser(unet, adapter), list(adapter.parameters()), features, []
    if name.startswith("faceid"):
        clip = VIT_H["penultimate"] if method.inputs == "face+image" else None
        adapter = IPAdapter.for_unet(
            unet, method, 512, clip_embed_dim=clip[-1] if clip else None, lora_rank=128
        ).requires_grad_(True)
        condition = {"embeds": torch.randn(1, 1, 512), "clip": torch.randn(1, *clip) if clip else None}
        return FaceIDDenoiser(unet, adapter), list(adapter.parameters()), condition, []
    adapter = IPAdapter.for_unet(unet, method, 512).requires_grad_(True)
    controlnet = ControlNetModel.from_unet(unet).requires_grad_(True)
    condition = {"embeds": torch.randn(1, 1, 512), "control": torch.rand(1, 3, size * 8, size * 8)}
    model = IdentityNetDenoiser(unet, adapter, controlnet)
    return model, [*adapter.parameters(), *controlnet.parameters()], condition, [controlnet]


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
        model, trainable, condition, controlnets = _unet_model(name, unet)
        adapter = model.adapter
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)

        def step(model=model, optimizer=optimizer, condition=condition) -> None:
            model(latents, t, text, condition).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def attached(fn, adapter=adapter, controlnets=controlnets) -> Callable[[], None]:
            """Attach only around the adapter step: the bare step must run the UNet's own processors."""

            def run() -> None:
                adapter.attach(unet, controlnets)
                try:
                    fn()
                finally:
                    adapter.detach()

            return run

        a, b = _interleaved(bare, attached(step), rounds)
        _report(name, a, b, sum(p.numel() for p in trainable) / 1e6)


def flux_ratio(kind: str, rounds: int, image_tokens: int = 256, text_tokens: int = 128) -> None:
    """InstantCharacter's training step (projector with gradient + subject attention on every block) over
    the bare FLUX transformer's forward + backward, on a reduced FLUX."""
    from diffusers import FluxTransformer2DModel

    from idcraft.instantcharacter.adapter import InstantCharacterAdapter
    from idcraft.instantcharacter.projector import ProjectorConfig
    from idcraft.training.instantcharacter import SubjectDenoiser, split_features

    torch.manual_seed(0)
    config = FLUX_CONFIGS[kind]
    width = config["attention_head_dim"] * config["num_attention_heads"]
    context = 4 * width // 3 // 64 * 64  # T5 is 4/3 of FLUX's width
    head = config["attention_head_dim"]
    transformer = FluxTransformer2DModel(
        **config,
        joint_attention_dim=context,
        pooled_projection_dim=256,
        guidance_embeds=True,
        axes_dims_rope=(head // 8, 7 * head // 16, 7 * head // 16),  # FLUX.1's split (16, 56, 56) of 128
    ).eval()
    transformer.requires_grad_(False)
    encoder_width = 7 * width // 8 // 64 * 64  # SigLIP + DINOv2 (2688) is 7/8 of FLUX's width (3072)
    projector = ProjectorConfig(
        width=encoder_width,
        cross_layer_blocks=2,
        cross_scale_blocks=2,
        block_ff_inner=4 * encoder_width,
        mlp_hidden=2 * encoder_width,
        resampler_width=width // 2,
        resampler_depth=2,
        resampler_ff_inner=2 * width,
        num_tokens=256,
        output_width=context,
        timestep_channels=320,
    )
    adapter = InstantCharacterAdapter.for_transformer(transformer, projector).requires_grad_(True)
    patches = 64  # encoder tokens per view (729 at SigLIP's 384 px)
    features = torch.randn(1, 8 * patches, encoder_width)
    side = int(image_tokens**0.5)
    image_ids = torch.zeros(image_tokens, 3)
    image_ids[:, 1] = torch.arange(image_tokens) // side
    image_ids[:, 2] = torch.arange(image_tokens) % side
    latents = torch.randn(1, image_tokens, 64)
    text = torch.randn(1, text_tokens, context)
    pooled = torch.randn(1, 256)
    sigmas = torch.tensor([0.5])
    guidance = torch.tensor([3.5])
    text_ids = torch.zeros(text_tokens, 3)
    model = SubjectDenoiser(transformer, adapter)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4, weight_decay=0.01)
    names = list(transformer.attn_processors)
    own = dict(transformer.attn_processors)
    subject = {names[int(i)]: proc for i, proc in adapter.layers.items()}
    keep = torch.tensor([True])

    def bare() -> None:
        transformer.set_attn_processor(dict(own))  # it empties the dict it is given
        x = latents.clone().requires_grad_(True)
        out = transformer(
            hidden_states=x,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=sigmas,
            img_ids=image_ids,
            txt_ids=text_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        out.square().mean().backward()

    def step() -> None:
        transformer.set_attn_processor(dict(subject))
        try:
            out = model(latents, sigmas, text, pooled, text_ids, image_ids, guidance, features, keep)
            out.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            transformer.set_attn_processor(dict(own))  # it empties the dict it is given

    params = sum(p.numel() for p in transformer.parameters()) / 1e6
    print(
        f"\nFLUX {kind}: {config['num_layers']} double + {config['num_single_layers']} single blocks, width "
        f"{width} ({params:.0f}M params), {image_tokens} image + {text_tokens} text + 256 subject tokens, "
        f"batch 1, float32, {torch.get_num_threads()} threads"
    )
    a, b = _interleaved(bare, step, rounds)
    _report("instantcharacter", a, b, sum(p.numel() for p in adapter.parameters()) / 1e6)

    def projector_only() -> None:
        """The projector with gradient alone: a cost per sample that does not grow with the transformer's
        depth, unlike the subject attention (one branch per block). Read the ratio with it in mind: on
        this shallow transformer the projector weighs far more than beside FLUX.1's 57 blocks."""
        shallow, deep, high = split_features(features)
        tokens = adapter.projector.tokens(adapter.projector.prepare(shallow, deep, high), sigmas * 1000)
        tokens.square().mean().backward()
        optimizer.zero_grad(set_to_none=True)

    times = [_interleaved(projector_only, projector_only, 1)[0][0] for _ in range(rounds)]
    share = statistics.median(times) / statistics.median(b)
    print(
        f"  {'':22s} of which the projector (forward + backward): {statistics.median(times):.2f} s "
        f"({100 * share:.0f} % of the adapter step)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--unet", choices=CONFIGS, default="sd15")
    parser.add_argument("--flux", choices=FLUX_CONFIGS, default="ci")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rounds", type=int, default=2, help="A/B pairs timed per method in part 2")
    parser.add_argument("--tiny-steps", type=int, default=12)
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--skip-unet", action="store_true", help="skip part 2 (UNet and FLUX ratios)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_tiny:
        tiny_throughput(args.methods, args.tiny_steps)
    if not args.skip_unet:
        unet_methods = [m for m in args.methods if m != "instantcharacter"]
        if unet_methods:
            unet_ratio(args.unet, unet_methods, args.rounds)
        if "instantcharacter" in args.methods:
            flux_ratio(args.flux, args.rounds)


if __name__ == "__main__":
    main()
