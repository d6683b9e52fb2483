"""The ``spotune`` console script: one subcommand per recipe or tool.

Each command lives in its own module, which exposes ``register(subparsers)``; that function adds
its parser and sets ``func`` (called with the parsed args, returns an exit code). Adding a command
is one line in :data:`COMMAND_MODULES`. Heavy imports (torch, diffusers) happen inside the
commands, so ``spotune --help`` is instant.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from typing import Callable

# SPOTUNE_DEBUG=1 does what --debug does, for launchers (accelerate, schedulers) that pass no flags.
DEBUG_ENV = "SPOTUNE_DEBUG"
# Exit status of a command stopped by Ctrl-C: the shell's 128 + SIGINT (SIGTERM / SIGUSR1: 143, from
# spotune.errors.Terminated.exit_code).
INTERRUPTED_EXIT = 130
# What a Ctrl-C or a SIGTERM leaves behind, for commands that do not say it themselves (recipes raise
# RunInterrupted / Terminated with where the run stopped and its checkpoint).
INTERRUPTED_NOTES = {
    "generate": "interrupted; the images written so far are kept and the same command makes the rest",
    "export": "interrupted; nothing was written under the output's name (its temporary files were removed)",
    "eval": "interrupted; no report was written under output_dir (its temporary files were removed)",
}

COMMAND_MODULES = [
    "spotune.commands.train",
    "spotune.commands.export",
    "spotune.commands.generate",
    "spotune.commands.eval",
    "spotune.commands.train_spm",
    "spotune.commands.eval_spm",
    "spotune.commands.demo",
    "spotune.commands.plan",
    "spotune.commands.view",
]


def say(line: str) -> None:
    """Write one line to stderr in a single write: the processes of a multi-process run end at once, and
    print's separate write of the newline let their lines run into one another."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotune",
        description="Step-by-step Preference Optimization (SPO) for text-to-image diffusion models.",
    )
    from spotune import __version__

    parser.add_argument("--version", action="version", version=f"spotune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="print debug logs")
    parser.add_argument(
        "--debug", action="store_true",
        help=f"print debug logs, and full tracebacks instead of one-line errors (or set {DEBUG_ENV}=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for sub in subparsers.choices.values():
        # Also accepted after the command (`spotune train ... --debug`); SUPPRESS keeps a --debug given
        # before the command from being reset by the subcommand's default.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="full tracebacks (see spotune --help)")
    return parser


def _quiet_third_party() -> None:
    """Silence import-time chatter that says nothing about the user's run."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("transformers", "diffusers", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def debug_requested(args: argparse.Namespace) -> bool:
    """``--debug`` or ``SPOTUNE_DEBUG`` set to anything but empty / 0 / false / no."""
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_tool(program: str, run: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """The ``main`` of a ``python -m spotune...`` tool: bad input is one line on stderr and exit code 1; Ctrl-C
    (130) and SIGTERM / SIGUSR1 (143) one line too (a training inside it checkpoints first, as ``train`` does).

    ``--debug`` anywhere in ``argv`` (it is removed before ``run`` parses the rest) or ``SPOTUNE_DEBUG``
    gives the full traceback instead, as for ``spotune`` itself.
    """
    from spotune.errors import SpotuneError
    from spotune.utils import preemption

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or debug_requested(argparse.Namespace())
    preemption.program = program
    try:
        with preemption.terminate_on_signals():  # SIGTERM / SIGUSR1 end it as Ctrl-C does, exit 143
            return int(run([arg for arg in args if arg != "--debug"]) or 0)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        say(f"{program}: {interruption_line('', exc)}")
        return getattr(exc, "exit_code", INTERRUPTED_EXIT)
    except SpotuneError as exc:
        if debug:
            raise
        say(f"{program}: error: {exc}")
        return 1


def disk_full_message(exc: OSError) -> str:
    """One line for a full disk met outside spotune's own writers: the file and the space left there."""
    from pathlib import Path

    from spotune.utils.io import disk_full_error

    if exc.filename:
        return str(disk_full_error(Path(exc.filename)))
    return f"no space left on the device ({exc.strerror or exc}); free some space and run again"


def interruption_line(command: str, exc: KeyboardInterrupt) -> str:
    """What the CLI prints for a Ctrl-C or a SIGTERM: the recipe's own words, else what the command leaves."""
    from spotune.errors import Terminated

    if str(exc):  # recipes say where the run stopped and which checkpoint is kept
        return str(exc)
    note = INTERRUPTED_NOTES.get(command, "interrupted")
    if isinstance(exc, Terminated):
        return note.replace("interrupted", f"terminated by {exc.signal_name}", 1)
    return note


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = debug_requested(args)
    logging.basicConfig(
        level=logging.DEBUG if (args.verbose or debug) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    _quiet_third_party()
    from spotune.errors import SpotuneError
    from spotune.utils import preemption

    prefix = f"spotune {args.command}"
    preemption.program = prefix
    try:
        # SIGTERM / SIGUSR1 (a scheduler stopping the job) raise Terminated as Ctrl-C raises KeyboardInterrupt;
        # training loops defer them to a checkpoint (spotune.utils.preemption.PreemptionWatch).
        with preemption.terminate_on_signals():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        say(f"{prefix}: {interruption_line(args.command, exc)}")
        return getattr(exc, "exit_code", INTERRUPTED_EXIT)
    except SpotuneError as exc:
        if debug:
            raise
        say(f"{prefix}: error: {exc}")
        return 1
    except OSError as exc:
        if debug or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        say(f"{prefix}: error: {disk_full_message(exc)}")
        return 1


if __name__ == "__main__":  # `accelerate launch -m spotune.cli train ...`
    sys.exit(main())
