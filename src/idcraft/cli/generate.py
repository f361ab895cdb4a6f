"""``idcraft generate``: reference image(s) + prompt -> PNG(s)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..registry import METHODS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate images of a reference subject from a prompt",
        description="Generate images that keep the subject of --reference, following --prompt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--method", help=f"adapter method; detected from the checkpoint when left out ({', '.join(METHODS)})"
    )
    p.add_argument("--base", required=True, help="base model: a diffusers folder or hub id (SD1.5 or SDXL)")
    p.add_argument(
        "--adapter", required=True, help="adapter checkpoint (.bin or .safetensors, official layout)"
    )
    p.add_argument("--image-encoder", required=True, help="CLIP image encoder: folder or hub id")
    p.add_argument(
        "--reference",
        action="append",
        required=True,
        metavar="IMAGE",
        help="reference image; repeat for several (their tokens are combined side by side)",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds torch.Generator('cpu'), as diffusers and the official code do",
    )
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--scale", type=float, default=1.0, help="adapter scale (0 = base model alone)")
    p.add_argument("--width", type=int, default=None, help="default: the base model's native size")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--controlnet", help="ControlNet folder or hub id (it sees the text only)")
    p.add_argument("--control-image", help="conditioning image for --controlnet")
    p.add_argument("--controlnet-scale", type=float, default=1.0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="auto = float16 on GPU, float32 on CPU",
    )
    p.add_argument(
        "--output",
        default="idcraft.png",
        help="PNG path; several images are numbered NAME-0.png, NAME-1.png ...",
    )
    p.set_defaults(func=run)


def output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        path = path.with_suffix(path.suffix + ".png") if path.suffix else path.with_suffix(".png")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def run(args: argparse.Namespace) -> int:
    from ..errors import IdcraftError
    from ..images import load_image
    from ..pipeline import IPAdapterPipeline

    if args.num_images < 1 or args.steps < 1:
        raise IdcraftError("--num-images and --steps must be at least 1.")
    if bool(args.controlnet) != bool(args.control_image):
        raise IdcraftError("--controlnet and --control-image go together.")
    references = [load_image(r) for r in args.reference]  # fail on a bad image before loading models
    control = load_image(args.control_image) if args.control_image else None
    pipe = IPAdapterPipeline.from_pretrained(
        args.base,
        args.adapter,
        args.image_encoder,
        method=args.method,
        controlnet=args.controlnet,
        device=args.device,
        dtype=None if args.dtype == "auto" else args.dtype,
    )
    images = pipe(
        args.prompt,
        references,
        negative_prompt=args.negative_prompt,
        scale=args.scale,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        control_image=control,
        controlnet_scale=args.controlnet_scale,
        progress=sys.stderr.isatty(),
    )
    for image, path in zip(images, output_paths(args.output, len(images)), strict=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(path)
    return 0
