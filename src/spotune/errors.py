"""The root of every error caused by the user's input, and the interruption of a run.

Modules define their own specific error classes deriving from :class:`SpotuneError` (and from the
built-in exception that fits, so library users can also catch ``ValueError`` etc.). The CLI prints
any :class:`SpotuneError` as one line naming the file, key or row, without a traceback (exit 1), a
Ctrl-C as one line too (exit 130), and a SIGTERM / SIGUSR1 the same way (exit 143).
"""

from __future__ import annotations


class SpotuneError(Exception):
    """An input problem the user can fix: the message says what, where, and what was expected."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run; the message says where, and which checkpoint is kept.

    A :class:`KeyboardInterrupt`, so that ``except Exception`` blocks never swallow it, and every writer's
    ``except BaseException`` removes its temporaries. The CLI exits with :attr:`exit_code`.
    """

    exit_code = 130  # the shell's 128 + SIGINT


class Terminated(RunInterrupted):
    """SIGTERM or SIGUSR1 (a scheduler's preemption) stopped a command; exit status 143 (128 + SIGTERM).

    Raised by the signal handler of :func:`spotune.utils.preemption.terminate_on_signals` (no message: the
    CLI says what the command leaves behind), or by a training recipe after it wrote its checkpoint (the
    message says where the run stopped and how to continue).

    Args:
        signal_name: the signal, e.g. ``"SIGTERM"``.
    """

    exit_code = 143

    def __init__(self, *args: object, signal_name: str = "SIGTERM") -> None:
        super().__init__(*args)
        self.signal_name = signal_name


def one_line(exc: BaseException) -> str:
    """``exc`` as ``Type: message`` on one line (third-party messages often span several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
