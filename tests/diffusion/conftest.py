"""Fixtures of the sampler tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def sdxl():
    """The tiny SDXL-architecture pipeline (built once per test module; the tests do not modify it)."""
    from spotune.models.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline()
