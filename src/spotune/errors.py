"""The root of every error caused by the user's input, and the interruption of a run.

Modules define their own specific error classes deriving from :class:`SpotuneError` (and from the
built-in exception that fits, so library users can also catch ``ValueError`` etc.). The CLI prints
any :class:`SpotuneError` as one line naming the file, key or row, without a traceback (exit 1), and
a Ctrl-C as one line too (exit 130).
"""

from __future__ import annotations


class SpotuneError(Exception):
    """An input problem the user can fix: the message says what, where, and what was expected."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run; the message says where, and which checkpoint is kept.

    A :class:`KeyboardInterrupt`, so that ``except Exception`` blocks never swallow it.
    """


def one_line(exc: BaseException) -> str:
    """``exc`` as ``Type: message`` on one line (third-party messages often span several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
