"""``idcraft demo``: placeholder until the bundled offline world lands."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the main job on the bundled offline default")
    p.add_argument("--output", default="idcraft-demo")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo

    run_demo(args.output)
    return 0
