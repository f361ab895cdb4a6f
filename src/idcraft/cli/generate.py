"""``idcraft generate``: reference image(s) + prompt -> PNG(s)."""

from __future__ import annotations

import argparse
import sys

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
    p.add_argument(
        "--base",
        required=True,
        help="base model: a diffusers folder or hub id (SD1.5, SDXL, or FLUX.1 for instantcharacter)",
    )
    p.add_argument(
        "--adapter", required=True, help="adapter checkpoint (.bin or .safetensors, official layout)"
    )
    p.add_argument(
        "--image-encoder",
        help="CLIP image encoder: folder or hub id (every method but faceid and faceid-portrait); "
        "for instantcharacter the SigLIP encoder (google/siglip-so400m-patch14-384)",
    )
    p.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="IMAGE",
        help="reference image; repeat for several (see the README for how each method combines them)",
    )
    faces = p.add_argument_group("face methods (faceid, faceid-plus, faceid-plusv2, faceid-portrait)")
    faces.add_argument(
        "--face-embedding",
        action="append",
        metavar="FILE.npy",
        help="raw ArcFace embedding (as `idcraft faces --save-embeddings` writes it); repeatable; "
        "skips face analysis. Each method normalises it as its official code does",
    )
    faces.add_argument(
        "--s-scale", type=float, default=1.0, help="FaceID-PlusV2: weight of the CLIP face structure"
    )
    faces.add_argument(
        "--face-backend",
        default="insightface",
        help="face analysis for --reference photos: an ArcFace recogniser is required (insightface)",
    )
    faces.add_argument(
        "--face-models", metavar="DIR", help="insightface model pack folder (antelopev2, buffalo_l)"
    )
    faces.add_argument("--face-index", type=int, default=0, help="which face of each photo: 0 = largest")
    faces.add_argument(
        "--multi-person",
        action="store_true",
        help="each --reference (or each face of a single group photo) is a different person, kept in its "
        "own region of the output; without it several photos are one person",
    )
    flux = p.add_argument_group(
        "instantcharacter (FLUX.1)",
        "The reference is used as it is (one image; no background removal): a cut-out with transparency "
        "(RGBA PNG) is composited on white, the background the official examples use.",
    )
    flux.add_argument(
        "--image-encoder-2", metavar="DIR", help="DINOv2 encoder folder or hub id (facebook/dinov2-giant)"
    )
    flux.add_argument(
        "--offload",
        choices=["none", "model", "sequential"],
        default="none",
        help="keep weights in RAM and move them to the GPU when used: per model (diffusers "
        "enable_model_cpu_offload) or per layer (enable_sequential_cpu_offload, least GPU memory, slowest)",
    )
    flux.add_argument(
        "--true-cfg",
        type=float,
        default=1.0,
        help="true classifier-free guidance scale with --negative-prompt (a second pass per step); 1 = off, "
        "as in the official pipeline (FLUX-dev is guided by --guidance through its guidance embedding)",
    )
    flux.add_argument(
        "--skip-memory-check",
        action="store_true",
        help="run even when the memory estimate printed before loading says it does not fit",
    )
    p.add_argument("--prompt", required=True, help="what the image should show")
    p.add_argument("--negative-prompt", default="", help="what the image should not show")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds torch.Generator('cpu'), as diffusers and the official code do",
    )
    p.add_argument("--steps", type=int, default=None, help="default: 30 (28 for instantcharacter)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale; for instantcharacter FLUX's guidance embedding. "
        "Default: 7.5 (3.5 for instantcharacter)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help="adapter scale, instantcharacter's subject scale (0 = base model alone). Default: 1.0 "
        "(0.8 for instantcharacter)",
    )
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="default: the base model's native size (InstantID: the reference's)",
    )
    p.add_argument("--height", type=int, default=None, help="default: the base model's native size")
    p.add_argument("--num-images", type=int, default=1, help="images to generate from the one seed")
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="DIR",
        help="ControlNet folder or hub id; repeatable. It sees the text only; for instantid the first one is "
        "IdentityNet (it sees the face tokens, and its keypoint image is drawn for you)",
    )
    p.add_argument(
        "--control-image",
        action="append",
        default=[],
        metavar="IMAGE",
        help="condition image of each other ControlNet",
    )
    p.add_argument(
        "--controlnet-scale",
        type=float,
        action="append",
        metavar="S",
        help="per ControlNet, in order (1.0 when left out)",
    )
    p.add_argument(
        "--keypoints",
        metavar="FILE.json",
        help="instantid: five [x, y] face keypoints in output pixels (default: the reference's own, in its frame)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="auto = float16 on GPU (bfloat16 for instantcharacter), float32 on CPU",
    )
    p.add_argument(
        "--output",
        default="idcraft.png",
        help="image path; the extension picks the format (.png, .jpg, .webp); several images are numbered "
        "NAME-0.png, NAME-1.png ...",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def request_from_args(args: argparse.Namespace):
    """The flags as a :class:`~idcraft.requests.GenerationRequest` (files read, nothing loaded)."""
    from ..images import load_image
    from ..inputs import load_embedding, load_keypoints
    from ..requests import GenerationRequest

    return GenerationRequest(
        prompt=args.prompt,
        method=args.method,
        references=[load_image(r) for r in args.reference],  # a bad input fails before models load
        face_embeddings=[load_embedding(f) for f in args.face_embedding] if args.face_embedding else None,
        negative_prompt=args.negative_prompt,
        scale=args.scale,
        s_scale=args.s_scale,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        control_images=[load_image(c) for c in args.control_image],
        controlnet_scales=args.controlnet_scale,
        keypoints=load_keypoints(args.keypoints) if args.keypoints else None,
        multi_person=args.multi_person,
        face_index=args.face_index,
        true_cfg=args.true_cfg,
        progress=sys.stderr.isatty(),
    )


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..errors import IdcraftError
    from ..methods import family_of
    from ..outputs import atomic_save_image, check_output_paths
    from ..registry import get_method
    from ..requests import GenerationRequest

    # Checks that need no model come first, in milliseconds: the settings, the method's options, the output.
    flags = GenerationRequest(
        prompt=args.prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        scale=args.scale,
        s_scale=args.s_scale,
        true_cfg=args.true_cfg,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        controlnet_scales=args.controlnet_scale,
        face_index=args.face_index,
    )
    flags.validate()
    method = args.method or ("instantcharacter" if args.image_encoder_2 or _flux_folder(args.base) else None)
    if method is not None:
        given = replace(
            flags,
            face_embeddings=args.face_embedding,
            control_images=args.control_image,
            keypoints=args.keypoints,
            multi_person=args.multi_person,
        )
        family_of(method).check(get_method(method), given)
    paths = check_output_paths(args.output, args.num_images, overwrite=args.overwrite)
    request = request_from_args(args)
    if not request.references and request.face_embeddings is None:
        raise IdcraftError("give at least one --reference image (or, for face methods, --face-embedding).")
    from ..engine import Engine

    engine = Engine.from_pretrained(
        args.base,
        args.adapter,
        args.image_encoder,
        method=args.method,
        image_encoder_2=args.image_encoder_2,
        controlnet=args.controlnet or None,
        device=args.device,
        dtype=None if args.dtype == "auto" else args.dtype,
        offload=None if args.offload == "none" else args.offload,
        check_memory=not args.skip_memory_check,
        width=args.width,
        height=args.height,
        report=lambda text: print(text, file=sys.stderr),
        face_backend=args.face_backend,
        face_models=args.face_models,
    )
    result = engine.generate(request)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for image, path in zip(result.images, paths, strict=True):
        atomic_save_image(image, path, overwrite=args.overwrite)
        print(path)
    return 0


def _flux_folder(base: str) -> bool:
    """Whether ``base`` is a local FLUX pipeline folder (read from its model_index.json, no imports)."""
    import json
    from pathlib import Path

    try:
        index = json.loads((Path(base) / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return str(index.get("_class_name", "")).startswith("Flux")
