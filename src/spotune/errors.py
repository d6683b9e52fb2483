"""The root of every error caused by the user's input.

Modules define their own specific error classes deriving from :class:`SpotuneError` (and from the
built-in exception that fits, so library users can also catch ``ValueError`` etc.). The CLI prints
any :class:`SpotuneError` as one line naming the file, key or row, without a traceback.
"""

from __future__ import annotations


class SpotuneError(Exception):
    """An input problem the user can fix: the message says what, where, and what was expected."""
