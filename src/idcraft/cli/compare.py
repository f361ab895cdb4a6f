"""``idcraft compare``: one reference and prompt through several methods and settings, side by side."""

from __future__ import annotations


def register(subparsers) -> None:
    from .evaluation import add_compare_arguments

    p = subparsers.add_parser(
        "compare",
        help="one reference and prompt through several methods and settings, side by side with scores",
        description="Generate --prompt with --reference through every model of --config (and each --scales, "
        "--steps and few-step --recipes setting) and write OUTPUT/compare.png: the reference, then one "
        "labelled image per method and setting with its scores under it (ArcFace SimRef/SimGT and copy "
        "score with --face-models and --ground-truth, CLIP-T/CLIP-I with --clip, DINO with --dino). The "
        "scores are also in OUTPUT/eval.csv; a re-run reuses what is done.",
    )
    add_compare_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .evaluation import run_compare

    return run_compare(args)
