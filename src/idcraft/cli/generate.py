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
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
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
    p.add_argument("--width", type=int, default=None, help="default: the base model's native size")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
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
        help="per ControlNet, in order (default 1.0)",
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


def load_embedding(path: str):
    """A saved embedding (``.npy``), as a flat float32 vector."""
    import numpy as np

    from ..errors import IdcraftError

    try:
        vector = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IdcraftError(
            f"{path}: cannot read this face embedding ({exc}); expected a .npy array."
        ) from exc
    if vector.ndim != 1 and not (vector.ndim == 2 and vector.shape[0] == 1):
        raise IdcraftError(f"{path}: expected one embedding vector, got an array of shape {vector.shape}.")
    return vector.reshape(-1).astype(np.float32)


def load_keypoints(path: str):
    """Five ``[x, y]`` pairs from a JSON file (a list, or ``{"kps": [...]}`` as ``idcraft faces --json``
    writes per face)."""
    import json

    import numpy as np

    from ..errors import IdcraftError

    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError) as exc:
        raise IdcraftError(
            f"{path}: cannot read keypoints ({exc}); expected JSON like [[x, y], ... 5 pairs]."
        ) from exc
    if isinstance(data, dict):
        data = data.get("kps", data.get("keypoints"))
    kps = np.asarray(data, dtype=np.float32) if data is not None else np.zeros(0)
    if kps.shape != (5, 2):
        raise IdcraftError(
            f"{path}: expected five [x, y] pairs (eyes, nose, mouth corners), got shape {kps.shape}."
        )
    return kps


def save_images(images, output: str) -> None:
    for image, path in zip(images, output_paths(output, len(images)), strict=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(path)


def runs_on_flux(args: argparse.Namespace) -> bool:
    """``--method`` names a FLUX method, or (no ``--method``) ``--base`` is a local FLUX pipeline folder."""
    from ..instantcharacter.pipeline import is_flux_base
    from ..registry import get_method

    if args.method:
        return get_method(args.method).base == "flux"
    return is_flux_base(args.base) or args.image_encoder_2 is not None


def run_instantcharacter(args: argparse.Namespace) -> int:
    from ..errors import IdcraftError
    from ..images import load_image
    from ..instantcharacter.pipeline import InstantCharacterPipeline

    unused = [
        flag
        for flag, value in (
            ("--face-embedding", args.face_embedding),
            ("--keypoints", args.keypoints),
            ("--controlnet", args.controlnet),
            ("--control-image", args.control_image),
            ("--multi-person", args.multi_person),
        )
        if value
    ]
    if unused:
        raise IdcraftError(f"{', '.join(unused)}: not used by instantcharacter.")
    if len(args.reference) != 1:
        raise IdcraftError(f"instantcharacter takes one --reference image ({len(args.reference)} given).")
    if not args.image_encoder or not args.image_encoder_2:
        raise IdcraftError(
            "instantcharacter reads the reference with two encoders: pass --image-encoder SIGLIP_DIR "
            "(google/siglip-so400m-patch14-384) and --image-encoder-2 DINOV2_DIR (facebook/dinov2-giant)."
        )
    reference = load_image(args.reference[0])  # fail on a bad input before loading models
    pipe = InstantCharacterPipeline.from_pretrained(
        args.base,
        args.adapter,
        args.image_encoder,
        args.image_encoder_2,
        device=args.device,
        dtype=None if args.dtype == "auto" else args.dtype,
        offload=args.offload,
        check_memory=not args.skip_memory_check,
        width=args.width,
        height=args.height,
        report=lambda text: print(text, file=sys.stderr),
    )
    images = pipe(
        args.prompt,
        reference,
        seed=args.seed,
        true_cfg=args.true_cfg,
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        progress=sys.stderr.isatty(),
        **method_defaults(args),
    )
    save_images(images, args.output)
    return 0


def method_defaults(args: argparse.Namespace) -> dict:
    """``--scale``, ``--steps``, ``--guidance`` where given; each pipeline has its method's defaults."""
    given = {"scale": args.scale, "steps": args.steps, "guidance": args.guidance}
    return {k: v for k, v in given.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    from ..errors import IdcraftError
    from ..images import load_image
    from ..pipeline import IPAdapterPipeline

    if args.num_images < 1 or (args.steps is not None and args.steps < 1):
        raise IdcraftError("--num-images and --steps must be at least 1.")
    if runs_on_flux(args):
        return run_instantcharacter(args)
    keypoints = load_keypoints(args.keypoints) if args.keypoints else None
    references = [load_image(r) for r in args.reference]  # fail on a bad input before loading models
    embeddings = [load_embedding(f) for f in args.face_embedding or []] or None
    if not references and embeddings is None:
        raise IdcraftError("give at least one --reference image (or, for face methods, --face-embedding).")
    control = [load_image(c) for c in args.control_image]
    pipe = IPAdapterPipeline.from_pretrained(
        args.base,
        args.adapter,
        args.image_encoder,
        method=args.method,
        controlnet=args.controlnet or None,
        device=args.device,
        dtype=None if args.dtype == "auto" else args.dtype,
    )
    tokens = pipe.encode_references(
        references,
        face_embeddings=embeddings,
        s_scale=args.s_scale,
        face_backend=args.face_backend,
        face_models=args.face_models,
        face_index=args.face_index,
        multi_person=args.multi_person,
    )
    images = pipe(
        args.prompt,
        tokens=tokens,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        control_image=control,
        controlnet_scale=args.controlnet_scale or [1.0] * len(args.controlnet),
        keypoints=keypoints,
        progress=sys.stderr.isatty(),
        **method_defaults(args),
    )
    save_images(images, args.output)
    return 0
