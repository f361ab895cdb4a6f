"""``idcraft generate``: reference image(s) + prompt -> image(s), through :class:`idcraft.engine.Engine`.

The request's flags come from :class:`idcraft.requests.GenerationRequest`'s own fields (their help text
included); this module adds the flags that say which models to load and where to write, checks what can
be checked before anything loads, and maps the flags to one request.
"""

from __future__ import annotations

import argparse
import os
import sys

#: Flags naming the models to load and where to write (not part of a request): flag -> argparse options.
MODEL_FLAGS: dict[str, dict] = {
    "--base": {"required": True, "help": "base model: diffusers folder or hub id (SD1.5, SDXL, FLUX.1)"},
    "--adapter": {"help": "adapter file (.bin or .safetensors, official layout); infiniteyou: the release "
                  "folder (InfuseNetModel/ + image_proj_model.bin, or its parent); not with --method none"},
    "--model-version": {"choices": ["aes_stage2", "sim_stage1"], "help": "infiniteyou: which model of the "
                        "release when --adapter is its parent folder (default aes_stage2)"},
    "--lora": {"action": "append", "default": [], "metavar": "FILE[:WEIGHT]", "help": "infiniteyou: a FLUX "
               "LoRA (the release's realism / anti-blur ones), repeatable; weight 1.0 by default"},
    "--image-encoder": {"help": "CLIP image encoder folder (SigLIP for instantcharacter)"},
    "--image-encoder-2": {"metavar": "DIR", "help": "instantcharacter: the DINOv2 encoder folder"},
    "--controlnet": {"action": "append", "default": [], "metavar": "DIR", "help": "ControlNet folder, "
                     "repeatable; for instantid the first is IdentityNet (its keypoint image is drawn for you)"},
    "--eva-clip": {"metavar": "FILE", "help": "pulid: EVA02-CLIP-L-14-336 checkpoint (EVA02_CLIP_L_336_psz14_s6B.pt; "
                   "an eva_clip config FILE.json beside it is read)"},
    "--face-parser": {"metavar": "FILE", "help": "pulid: BiSeNet face parser (facexlib's parsing_bisenet.pth)"},
    "--face-backend": {"default": "insightface", "help": "face analysis for face methods' --reference photos"},
    "--face-models": {"metavar": "DIR", "help": "insightface model pack folder (antelopev2, buffalo_l)"},
    "--device": {"default": "auto", "help": "cpu, cuda, cuda:1, mps or auto"},
    "--dtype": {"default": "auto", "choices": ["auto", "float32", "float16", "bfloat16"],
                "help": "auto = float16 on GPU (bfloat16 for FLUX), float32 on CPU"},
    "--offload": {"choices": ["none", "model", "sequential"], "default": "none",
                  "help": "instantcharacter, pulid-flux: keep weights in RAM, move them to the GPU per model or "
                  "layer"},
    "--skip-memory-check": {"action": "store_true", "help": "FLUX methods: run even if it may not fit"},
    "--output": {"default": "idcraft.png", "help": "image path, format from the extension (.png, .jpg, "
                 ".webp); several images are numbered NAME-0.png, NAME-1.png ..."},
    "--overwrite": {"action": "store_true", "help": "replace existing output files"},
}  # fmt: skip


def register(subparsers) -> None:
    from ..requests import request_flags
    from . import DefaultsHelpFormatter

    p = subparsers.add_parser(
        "generate",
        help="generate images of a reference subject from a prompt",
        description="Generate images that keep the subject of --reference, following --prompt. With "
        "--method none (no --adapter, no --reference) the base model alone draws the prompt.",
        formatter_class=DefaultsHelpFormatter,
    )
    for flag, kwargs in (*MODEL_FLAGS.items(), *request_flags()):
        p.add_argument(flag, **kwargs)
    p.set_defaults(func=run)


def request_from_args(args: argparse.Namespace, *, read_files: bool = True):
    """The flags as a :class:`~idcraft.requests.GenerationRequest`; with ``read_files`` the images,
    embeddings and keypoints are read (so a bad file fails before any model loads), else kept as paths."""
    from dataclasses import fields

    from ..images import load_image
    from ..inputs import load_embedding, load_keypoints
    from ..requests import GenerationRequest

    values = {f.name: getattr(args, f.name) for f in fields(GenerationRequest) if hasattr(args, f.name)}
    values["references"] = values["references"] or []
    values["control_images"] = values["control_images"] or []
    if read_files:
        values["references"] = [load_image(r) for r in values["references"]]
        values["control_images"] = [load_image(c) for c in values["control_images"]]
        if values["face_embeddings"]:
            values["face_embeddings"] = [load_embedding(f) for f in values["face_embeddings"]]
        if values["keypoints"]:
            values["keypoints"] = load_keypoints(values["keypoints"])
        if values.get("aligned_faces"):
            values["aligned_faces"] = [load_image(a) for a in values["aligned_faces"]]
        if values.get("face_parsings"):
            from ..pulid.preprocess import read_label_map

            values["face_parsings"] = [read_label_map(p) for p in values["face_parsings"]]
    return GenerationRequest(**values, progress=sys.stderr.isatty())


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..errors import IdcraftError
    from ..methods import family_of
    from ..methods.text_only import TEXT_ONLY, is_text_only
    from ..outputs import atomic_save_image, check_output_paths
    from ..prechecks import check_adapter_fits_base, check_device_available, check_local_path
    from ..registry import get_method
    from ..requests import check_device

    # Checks that need no model come first, in milliseconds: the settings, the method's options, the output.
    flags = request_from_args(args, read_files=False)
    replace(flags, keypoints=None).validate()  # keypoints are still a file name here
    check_device(args.device)
    from ..engine import method_from_files

    method = args.method or method_from_files(args.adapter, args.base, args.image_encoder_2)
    text_only = is_text_only(method)
    if method is not None:
        chosen = TEXT_ONLY if text_only else get_method(method)
        family_of(chosen).check(chosen, flags)
    if text_only and (args.adapter or args.image_encoder or args.controlnet):
        raise IdcraftError(
            "--method none draws with the base model alone: leave out --adapter, --image-encoder "
            "and --controlnet."
        )
    if not text_only and not args.adapter:
        raise IdcraftError(
            "give the adapter file with --adapter (or --method none for the base model alone)."
        )
    paths = check_output_paths(args.output, args.num_images, overwrite=args.overwrite)
    request = request_from_args(args)
    # what a header or torch.cuda tells, before 30-100 s of loading
    for what, name in (
        ("base model", args.base),
        ("image encoder", args.image_encoder),
        ("image encoder 2", args.image_encoder_2),
        *(("ControlNet", c) for c in args.controlnet or ()),
    ):
        if name is not None:
            check_local_path(what, name)
    if args.adapter:
        check_adapter_fits_base(args.base, args.adapter)
    check_device_available(args.device)
    if not text_only and not request.references and not request.face_embeddings:
        raise IdcraftError(
            "give at least one --reference image (or, for face methods, --face-embedding); --method none "
            "draws from the prompt alone."
        )
    from ..engine import Engine
    from . import quiet_libraries

    quiet_libraries(args.verbose)
    engine = Engine.from_pretrained(
        args.base,
        args.adapter,
        args.image_encoder,
        method=args.method,
        image_encoder_2=args.image_encoder_2,
        controlnet=args.controlnet or None,
        model_version=args.model_version,
        loras=_loras(args.lora),
        device=args.device,
        dtype=None if args.dtype == "auto" else args.dtype,
        offload=None if args.offload == "none" else args.offload,
        check_memory=not args.skip_memory_check,
        width=args.width,
        height=args.height,
        report=lambda text: print(text, file=sys.stderr),
        face_backend=args.face_backend,
        face_models=args.face_models,
        eva_clip=args.eva_clip,
        face_parser=args.face_parser,
    )
    from ..cancel import CancelToken
    from ..errors import Cancelled
    from .interrupt import cancel_on_interrupt

    try:
        with cancel_on_interrupt(CancelToken()) as token:
            result = engine.generate(request, cancel=token)
    except Cancelled:  # Ctrl-C: stopped at a step boundary, nothing written
        raise KeyboardInterrupt from None
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for image, path in zip(result.images, paths, strict=True):
        atomic_save_image(image, path, overwrite=args.overwrite)
        print(path)
    return 0


def _loras(values: list[str]) -> list[tuple[str, float]]:
    """``FILE`` or ``FILE:WEIGHT`` -> ``(file, weight)``."""
    from ..errors import IdcraftError

    out = []
    for value in values or []:
        path, sep, weight = value.rpartition(":")
        if not sep or not _is_float(weight):
            path, weight = value, "1.0"
        out.append((path, float(weight)))
        if not os.path.isfile(path):
            raise IdcraftError(f"--lora {path}: no such file.")
    return out


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
