"""Paths the user typed, made absolute: a symbolic-link loop is one line naming the path and the key."""

from __future__ import annotations

import errno
from pathlib import Path

from spotune.errors import SpotuneError


class PathError(SpotuneError, ValueError):
    """A path that cannot be followed to a file or folder (a symbolic-link loop, an unreadable link)."""


def resolve_user_path(path: str | Path, key: str) -> Path:
    """``path`` (``~`` expanded) made absolute with its symbolic links followed.

    ``Path.resolve`` raises ``RuntimeError("Symlink loop ...")`` on a loop before Python 3.13 and an
    ``OSError`` on other link trouble; either becomes a :class:`PathError` that names ``path`` and ``key``.

    Args:
        path: a file or folder the user gave; it need not exist.
        key: how the user gives it, e.g. ``"--images FOLDER"`` or ``"output_dir=FOLDER"``.
    """
    path = Path(path).expanduser()
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        if isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP:
            problem = "is a symbolic-link loop (its links lead back to themselves)"
        else:
            problem = f"cannot be followed to a file or folder ({exc.strerror or exc})"
        raise PathError(f"{path} {problem}; give {key} a real file or folder") from None
