"""``idcraft eval``: identity and prompt accuracy of every bundled method on held-out identities
(see :mod:`idcraft.world.evaluate`)."""

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
        help="measure identity transfer vs prompt following on the offline world's held-out identities",
        description="Generate held-out identities in fixed random scenes with every bundled method at each "
        "adapter scale, and the baselines, and score each output with the bundled judge. Writes eval.json, "
        "eval.md, eval.png (prompt accuracy vs identity accuracy) and samples.png into --output.",
    )
    p.add_argument("--output", default="idcraft-eval", help="folder for the results (default: %(default)s)")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=ADAPTER_METHODS,
        default=None,
        help="adapter methods (default: every one in the bundle)",
    )
    p.add_argument(
        "--scales",
        nargs="+",
        type=float,
        default=list(DEFAULT_SCALES),
        help=f"adapter scales (default: {' '.join(f'{s:g}' for s in DEFAULT_SCALES)})",
    )
    p.add_argument(
        "--baselines",
        nargs="*",
        choices=BASELINES,
        default=list(BASELINES),
        help="baselines measured alongside (default: all)",
    )
    p.add_argument("--ids", type=int, default=None, help="use the first N held-out identities (default: all)")
    p.add_argument(
        "--scenes-per-id",
        type=int,
        default=DEFAULT_SCENES_PER_ID,
        help="random scenes per identity (default: %(default)s)",
    )
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps (default: %(default)s)")
    p.add_argument(
        "--guidance",
        type=float,
        default=DEFAULT_GUIDANCE,
        help="classifier-free guidance scale (default: %(default)s)",
    )
    p.add_argument(
        "--prompt",
        choices=PROMPTS,
        default="coarse",
        help="adapter prompts: the caption naming the coarse identity, or the scene only (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="fixes the scenes and the noise (default: %(default)s)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help="images per pipeline call (default: %(default)s)",
    )
    p.add_argument(
        "--bundle",
        metavar="DIR",
        help="world bundle folder (default: $IDCRAFT_WORLD_BUNDLE or the packaged one)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import IdcraftError
    from ..world.evaluate import evaluate, format_table

    if args.ids is not None and args.ids < 1:
        raise IdcraftError("--ids must be at least 1.")
    if args.steps < 1 or args.batch_size < 1:
        raise IdcraftError("--steps and --batch-size must be at least 1.")
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
