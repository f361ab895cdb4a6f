"""``idcraft eval``: identity and prompt accuracy of every bundled method on held-out identities
(see :mod:`idcraft.world.evaluate`), or, with ``--config``, of real models on your references and prompts
(see :mod:`idcraft.evaluation` and :mod:`.evaluation`)."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    from ..world.evaluate import DEFAULT_SCALES, DEFAULT_SCENES_PER_ID
    from ..world.generate import (
        ADAPTER_METHODS,
        BASELINES,
        DEFAULT_BATCH,
        DEFAULT_GUIDANCE,
        DEFAULT_STEPS,
        PROMPTS,
    )

    p = subparsers.add_parser(
        "eval",
        help="measure identity transfer vs prompt following: the offline world's held-out identities, or "
        "real models (--config) on your references",
        description="Without --config: generate held-out identities of the offline world in fixed random "
        "scenes with every bundled method at each adapter scale, and the baselines, and score each output with "
        "the bundled judge; writes eval.json, eval.md, eval.png (prompt accuracy vs identity accuracy) and "
        "samples.png into --output. With --config MODELS.yaml --references DIR --prompts ...: run the grid "
        "model x few-step recipe x scale x steps on your references and score identity (ArcFace SimRef/SimGT, "
        "copy-paste), prompt (CLIP-T), CLIP-I and DINO; writes eval.csv, eval.md, eval.json, scatter.png and "
        "grid.png, resumable (finished cells are not redone).",
    )
    p.add_argument("--output", default="idcraft-eval", help="folder for the results (default: %(default)s)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"adapter methods: world {', '.join(ADAPTER_METHODS)}; with --config, model labels "
        "(default: every one in the bundle / the config)",
    )
    p.add_argument(
        "--scales",
        nargs="+",
        type=float,
        default=None,
        help=f"adapter scales (default: {' '.join(f'{s:g}' for s in DEFAULT_SCALES)}; with --config 1.0)",
    )
    p.add_argument(
        "--baselines",
        nargs="*",
        default=None,
        help=f"baselines measured alongside: world {', '.join(BASELINES)} (default: all); with --config: copy "
        "(default: copy)",
    )
    p.add_argument("--ids", type=int, default=None, help="use the first N held-out identities (default: all)")
    p.add_argument(
        "--scenes-per-id",
        type=int,
        default=DEFAULT_SCENES_PER_ID,
        help="random scenes per identity (default: %(default)s)",
    )
    p.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        help=f"sampling steps (default: {DEFAULT_STEPS}; with --config each method's; several: a grid axis)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"classifier-free guidance scale (default: {DEFAULT_GUIDANCE:g}; with --config each method's)",
    )
    p.add_argument(
        "--prompt",
        choices=PROMPTS,
        default="coarse",
        help="adapter prompts: the caption naming the coarse identity, or the scene only (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=None, help="fixes the scenes and the noise (default: 0)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"images per pipeline call (default: {DEFAULT_BATCH}; with --config 4)",
    )
    p.add_argument(
        "--bundle",
        metavar="DIR",
        help="world bundle folder (default: $IDCRAFT_WORLD_BUNDLE or the packaged one)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: %(default)s)")
    from .evaluation import add_model_arguments

    add_model_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.config or args.references:
        from .evaluation import run_model_eval

        return run_model_eval(args)
    return run_world(args)


def run_world(args) -> int:
    """The offline world's evaluation (no --config): the defaults and choices it always had."""
    from ..errors import IdcraftError
    from ..world.evaluate import DEFAULT_SCALES, evaluate, format_table
    from ..world.generate import ADAPTER_METHODS, BASELINES, DEFAULT_BATCH, DEFAULT_GUIDANCE, DEFAULT_STEPS

    for flag, given, choices in (
        ("--methods", args.methods, ADAPTER_METHODS),
        ("--baselines", args.baselines, BASELINES),
    ):
        unknown = [name for name in given or () if name not in choices]
        if unknown:
            raise IdcraftError(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(choices)}.")
    if args.steps is not None and len(args.steps) > 1:
        raise IdcraftError("--steps: the world's evaluation takes one step count.")
    args.scales = list(DEFAULT_SCALES) if args.scales is None else args.scales
    args.baselines = list(BASELINES) if args.baselines is None else args.baselines
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps[0]
    args.guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    args.seed = 0 if args.seed is None else args.seed
    args.batch_size = DEFAULT_BATCH if args.batch_size is None else args.batch_size
    if args.ids is not None and args.ids < 1:
        raise IdcraftError("--ids must be at least 1.")
    if args.steps < 1 or args.batch_size < 1:
        raise IdcraftError("--steps and --batch-size must be at least 1.")
    _check_output_folder(args.output)
    from ..prechecks import check_device_available

    check_device_available(args.device)
    report = evaluate(
        args.output,
        methods=args.methods,
        scales=args.scales,
        baselines=args.baselines,
        ids=args.ids,
        scenes_per_id=args.scenes_per_id,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        bundle_root=args.bundle,
        batch_size=args.batch_size,
        prompt=args.prompt,
        device=args.device,
        progress=sys.stderr.isatty(),
    )
    print(format_table(report["results"]))
    print(f"wrote {args.output}/eval.json, eval.md, eval.png, samples.png ({report['seconds']:.0f} s)")
    return 0


def _check_output_folder(output) -> None:
    """The report goes into a folder: a file in its place, or a folder that cannot be written, is refused
    before anything is generated (not after minutes of generating)."""
    from pathlib import Path

    from ..errors import IdcraftError
    from ..outputs import check_writable_folder

    if Path(output).exists() and not Path(output).is_dir():
        raise IdcraftError(f"--output {output}: is a file; the evaluation writes a folder (eval.json ...).")
    check_writable_folder(Path(output), create=False)
