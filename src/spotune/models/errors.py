"""The error of model loading (a leaf module: the loader and the single-file converters both raise it)."""

from __future__ import annotations

from spotune.errors import SpotuneError


class ModelLoadError(SpotuneError, RuntimeError):
    """A model source that does not exist, is incomplete, or cannot be read."""


__all__ = ["ModelLoadError"]
