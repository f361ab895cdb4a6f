"""Flags shared by ``idcraft eval --config`` (real models) and ``idcraft compare`` (see
:mod:`idcraft.evaluation`)."""

from __future__ import annotations

import sys
from pathlib import Path


def add_model_arguments(p, *, compare: bool = False) -> None:
    """Flags for evaluating real models: config, inputs, recipes, seeds, size and scoring models. (``eval``
    shares ``--methods``, ``--scales``, ``--steps``, ``--guidance``, ``--batch-size``, ``--baselines``,
    ``--device`` and ``--output`` with the world evaluation; ``compare`` adds its own.)"""
    group = p.add_argument_group(
        "real models" if not compare else "models",
        None
        if compare
        else "With --config, idcraft eval runs the models of a models.yaml on your references and prompts "
        "(the offline world's evaluation runs when --config is left out).",
    )
    group.add_argument(
        "--config",
        metavar="MODELS.yaml",
        required=compare,
        help="model files per method and few-step recipes; may also hold `grid:` and `scoring:` sections",
    )
    if compare:
        return
    group.add_argument(
        "--references",
        "--manifest",
        dest="references",
        metavar="DIR|FILE.jsonl",
        help="references: a folder (NAME.png, optional NAME.gt.png = a second photo of the same person, or a "
        "sub-folder per subject) or a JSONL manifest of {id, reference, ground_truth, prompts}",
    )
    group.add_argument(
        "--prompts",
        nargs="+",
        metavar="PROMPT|FILE",
        help="prompts: text, or a .txt (one per line) / .json list file",
    )
    _grid_arguments(group)
    _scoring_arguments(p)


def add_compare_arguments(p) -> None:
    add_model_arguments(p, compare=True)
    p.add_argument("--reference", required=True, metavar="IMAGE", help="the reference image")
    p.add_argument(
        "--ground-truth",
        metavar="IMAGE",
        help="another photo of the same person (not shown to the models): SimGT and the copy score",
    )
    p.add_argument("--prompt", required=True, help="the prompt every method is given")
    p.add_argument("--methods", nargs="+", metavar="LABEL", help="models of --config (default: all)")
    p.add_argument("--scales", nargs="+", type=float, help="adapter scales (default: 1.0)")
    p.add_argument("--steps", nargs="+", type=int, help="sampling steps (default: each method's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: each method's)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=None, help="images per pipeline call (default: 4)")
    p.add_argument(
        "--baselines", nargs="*", default=None, help="baselines beside the methods: copy (default: none)"
    )
    p.add_argument("--tile", type=int, default=256, help="pixels per image in compare.png (default: 256)")
    p.add_argument("--output", default="idcraft-compare", help="folder for compare.png and the scores")
    p.add_argument("--device", default=None, help="cpu, cuda, mps or auto (default: the config's)")
    _grid_arguments(p)
    _scoring_arguments(p)


def _grid_arguments(group) -> None:
    group.add_argument(
        "--recipes",
        nargs="+",
        metavar="NAME",
        help="few-step recipes of --config to evaluate, `none` = without (default: none)",
    )
    group.add_argument("--seeds", nargs="+", type=int, metavar="N", help="noise seeds per item (default: 0)")
    group.add_argument("--width", type=int, help="output width (default: each method's)")
    group.add_argument("--height", type=int, help="output height (default: each method's)")
    group.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    group.add_argument(
        "--face-index",
        type=int,
        default=None,
        help="which face of each reference photo the face methods take (0 = largest); by default a photo "
        "with several faces is an error for them",
    )
    group.add_argument(
        "--dtype", default=None, help="float16, bfloat16, float32 or auto (default: the config's)"
    )


def _scoring_arguments(p) -> None:
    group = p.add_argument_group(
        "scoring models", "Folders on disk; a score whose model is not given is left out of the table."
    )
    group.add_argument(
        "--face-backend", default=None, help="face backend for identity scores (default: insightface)"
    )
    group.add_argument(
        "--face-models",
        metavar="DIR",
        default=None,
        help="insightface pack (antelopev2 / buffalo_l) for ArcFace identity scores (default: the config's)",
    )
    group.add_argument("--clip", metavar="DIR", default=None, help="CLIPModel folder: CLIP-T and CLIP-I")
    group.add_argument(
        "--dino", metavar="DIR", default=None, help="Dinov2Model (or any AutoModel) folder: DINO"
    )
    group.add_argument(
        "--copy-threshold",
        type=float,
        default=None,
        help="an image is flagged as a copy of the reference above this copy score (default: 0.5)",
    )


def _scoring(args, config):
    from ..errors import IdcraftError
    from ..evaluation import ScoringSettings
    from ..model_config import config_path

    section = dict(config.extra.get("scoring") or {})
    allowed = {"face_backend", "face_models", "clip", "dino", "copy_threshold", "device", "batch_size"}
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise IdcraftError(f"{config.source}: scoring: unknown key(s) {', '.join(unknown)}.")
    where = Path(config.source).parent if config.source else None
    for key in ("face_models", "clip", "dino"):
        section[key] = config_path(section.get(key), where)
    given = {
        "face_backend": args.face_backend,
        "face_models": args.face_models,
        "clip": args.clip,
        "dino": args.dino,
        "copy_threshold": args.copy_threshold,
    }
    section.update({k: v for k, v in given.items() if v is not None})
    if section.get("face_models") is None and section.get("face_backend") in (None, "insightface"):
        section["face_models"] = config.face_models
    return ScoringSettings(**section)


def _grid(args, config, *, compare: bool = False):
    from ..evaluation import GridSettings

    seeds = args.seeds
    if seeds is None and args.seed is not None:
        seeds = [args.seed]
    section = dict(config.extra.get("grid") or {})
    if compare:
        section.pop("baselines", None)
        section.setdefault("baselines", [])
    return GridSettings.resolve(
        section,
        models=args.methods,
        scales=args.scales,
        steps=args.steps,
        guidance=args.guidance,
        recipes=args.recipes,
        seeds=seeds,
        width=args.width,
        height=args.height,
        negative_prompt=args.negative_prompt,
        baselines=args.baselines,
        batch_size=args.batch_size,
        face_index=args.face_index,
    )


def run_model_eval(args) -> int:
    """``idcraft eval --config ...``."""
    from ..errors import IdcraftError
    from ..evaluation import read_prompts, read_subjects, run_eval
    from ..evaluation.report import format_table
    from ..model_config import config_path, load_models_config

    if not args.config:
        raise IdcraftError("--references needs --config MODELS.yaml (the model files of each method).")
    config = load_models_config(args.config)
    section = config.extra.get("grid") or {}
    where = Path(args.config).parent
    references = args.references or config_path(section.get("references"), where)
    if not references:
        raise IdcraftError(
            "give --references DIR|FILE.jsonl (or `references:` in the config's grid section)."
        )
    prompt_values = args.prompts
    if not prompt_values:
        listed = section.get("prompts") or []
        prompt_values = [config_path(listed, where)] if isinstance(listed, str) else [str(p) for p in listed]
    subjects = read_subjects(references)
    prompts = read_prompts(prompt_values or [])
    if not prompts and not all(s.prompts for s in subjects):
        raise IdcraftError(
            "give --prompts (text, or a .txt / .json file), or prompts per subject in the manifest."
        )
    report = run_eval(
        config,
        subjects,
        prompts,
        args.output,
        _grid(args, config),
        _scoring(args, config),
        device=None if args.device in (None, "auto") else args.device,
        dtype=args.dtype,
    )
    if report is None:  # a process other than rank 0: it generated its share
        return 0
    print(format_table(report["rows"]))
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(
        f"wrote {args.output}/eval.csv, eval.md, eval.json, scatter.png, grid.png "
        f"({report['generated_images']} image(s) generated, {report['seconds']:.0f} s)"
    )
    return 0


def run_compare(args) -> int:
    """``idcraft compare``."""
    from ..evaluation import run_compare as compare
    from ..evaluation.report import format_table
    from ..model_config import load_models_config

    config = load_models_config(args.config)
    report = compare(
        config,
        args.reference,
        args.prompt,
        args.output,
        _grid(args, config, compare=True),
        _scoring(args, config),
        ground_truth=args.ground_truth,
        tile=args.tile,
        device=None if args.device in (None, "auto") else args.device,
        dtype=args.dtype,
    )
    if report is None:
        return 0
    print(format_table(report["rows"]))
    print(f"wrote {report['compare']}")
    return 0
