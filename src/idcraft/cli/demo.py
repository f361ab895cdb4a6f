"""``idcraft demo``: the main job on the bundled offline world (see :mod:`idcraft.world.demo`)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the main job on the bundled offline world: a held-out character in new scenes",
        description="Give a held-out character's reference portrait to every bundled method, generate it in "
        "three new scenes beside the text-only baseline, write a labelled grid and print the judge's "
        "identity and prompt scores. Offline; on 2 CPU cores 11-136 s, up to 15 min when they are heavily shared.",
    )
    p.add_argument(
        "--output",
        default="idcraft-demo",
        help="folder for grid.png, reference.png, demo.json (default: %(default)s)",
    )
    p.add_argument("--identity", type=int, default=None, help="world identity id (default: a held-out one)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="picks the identity (unless --identity), scenes and noise (default: %(default)s)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="adapter scale (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    p.add_argument(
        "--bundle",
        metavar="DIR",
        help="world bundle folder (default: $IDCRAFT_WORLD_BUNDLE or the packaged one)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import IdcraftError
    from ..world.demo import DEMO_STEPS, run_demo

    steps = DEMO_STEPS if args.steps is None else args.steps
    if steps < 1:
        raise IdcraftError("--steps must be at least 1.")
    from ..prechecks import check_device_available

    check_device_available(args.device)
    run_demo(
        args.output,
        identity=args.identity,
        seed=args.seed,
        bundle_root=args.bundle,
        steps=steps,
        scale=args.scale,
        device=args.device,
    )
    return 0
