"""The ``idcraft`` command line: thin shells over the library API.

Each subcommand lives in its own module exposing ``register(subparsers)``; the module adds its parser and
sets ``func`` to a function taking the parsed arguments and returning an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__
from ..errors import IdcraftError

#: Subcommand modules, in the order ``idcraft --help`` lists them.
COMMANDS = ("generate", "demo", "eval", "compare", "batch", "faces", "train", "world", "serve")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds ``(default: X)`` to a flag's help where there is a default worth saying and the help text
    does not already say it (no "(default: None)", no default given twice)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default in (None, False, "", [], (), argparse.SUPPRESS) or not action.option_strings
        if quiet or "default" in text.lower():
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idcraft",
        description="Zero-shot identity- and character-preserving image generation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    parser.add_argument(
        "--version",
        action="version",
        version=f"idcraft {__version__}",
        help="print idcraft's version and exit",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    quiet_libraries(args.verbose)
    try:
        return int(args.func(args) or 0)
    except IdcraftError as exc:
        if args.verbose:
            raise
        print(f"idcraft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def quiet_libraries(verbose: bool = False) -> None:
    """Keep the terminal for what the user asked for: library notices only with --verbose, loading bars
    only on a terminal (generation progress is shown by the command itself).

    Cheap: it sets the libraries' own environment switches and, for diffusers' loading bars, acts when
    diffusers is first imported -- a command that fails its checks never imports the libraries at all."""
    import os
    import warnings

    if verbose:
        return
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        os.environ.setdefault(name, "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers and the hub read it

    def no_bars(diffusers) -> None:
        diffusers.utils.logging.disable_progress_bar()

    if "diffusers" in sys.modules:
        no_bars(sys.modules["diffusers"])
    else:
        sys.meta_path.insert(0, _WhenImported("diffusers", no_bars))


class _WhenImported:
    """An import hook that runs ``then(module)`` right after ``name`` is first imported, then leaves."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run, then = spec.loader.exec_module, self.then

        def exec_module(module) -> None:
            run(module)
            then(module)

        spec.loader.exec_module = exec_module
        return spec


if __name__ == "__main__":
    sys.exit(main())
