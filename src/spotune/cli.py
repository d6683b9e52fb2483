"""The ``spotune`` console script: one subcommand per recipe or tool.

Each command lives in its own module, which exposes ``register(subparsers)``; that function adds
its parser and sets ``func`` (called with the parsed args, returns an exit code). Adding a command
is one line in :data:`COMMAND_MODULES`. Heavy imports (torch, diffusers) happen inside the
commands, so ``spotune --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMAND_MODULES = [
    "spotune.commands.train",
    "spotune.commands.export",
    "spotune.commands.generate",
    "spotune.commands.eval",
    "spotune.commands.train_spm",
    "spotune.commands.eval_spm",
    "spotune.commands.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotune",
        description="Step-by-step Preference Optimization (SPO) for text-to-image diffusion models.",
    )
    from spotune import __version__

    parser.add_argument("--version", action="version", version=f"spotune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="print debug logs and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _quiet_third_party() -> None:
    """Silence import-time chatter that says nothing about the user's run."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("transformers", "diffusers", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    _quiet_third_party()
    from spotune.errors import SpotuneError

    try:
        return int(args.func(args) or 0)
    except SpotuneError as exc:
        if args.verbose:
            raise
        print(f"spotune {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # `accelerate launch -m spotune.cli train ...`
    sys.exit(main())
