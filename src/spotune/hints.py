"""Name the settings a user can type in error messages raised deep inside components.

A component (a judge loader, a scorer) knows its own parameter names (``clip_path``,
``processor_path``), but the user sets them through a command's config keys, which differ per
command (``judge_clip_path`` in ``spotune train``, ``pickscore_model`` in ``spotune eval``). A
command wraps its calls in :func:`config_keys` with that mapping, and components write their hints
with :func:`key`, so every hint names a key the user can pass as ``key=value``. Outside any
:func:`config_keys` block (library use) a hint names the Python parameter itself.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Mapping

_KEYS: ContextVar[Mapping[str, str]] = ContextVar("spotune_config_keys", default={})


@contextlib.contextmanager
def config_keys(mapping: Mapping[str, str] | None = None, **names: str) -> Iterator[None]:
    """Inside the block, :func:`key` turns each parameter name into the command's config key.

    Args:
        mapping, names: parameter name -> config key, e.g. ``clip_path="judge_clip_path"``.
    """
    token = _KEYS.set({**_KEYS.get(), **(mapping or {}), **names})
    try:
        yield
    finally:
        _KEYS.reset(token)


def key(param: str) -> str:
    """The config key that sets ``param`` in the running command (``param`` itself when none is known)."""
    return _KEYS.get().get(param, param)
