"""Judges for SPO: the preference-model protocol, pair selection, and the models themselves.

The model classes pull in transformers, so they are imported on first access (PEP 562): importing
``spotune.preference`` for the protocol stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from spotune.preference.protocol import PreferenceModel
from spotune.preference.select import select_pair

_LAZY = {
    "ClipStyleJudge": "spotune.preference.clip_judge",
    "PickScoreJudge": "spotune.preference.clip_judge",
    "StepAwarePreferenceModel": "spotune.preference.step_aware",
    "JudgeLoadError": "spotune.preference.loading",
    "build_judge": "spotune.preference.factory",
    "JUDGE_KINDS": "spotune.preference.factory",
    "JUDGE_DTYPES": "spotune.preference.factory",
}

__all__ = ["PreferenceModel", "select_pair", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spotune.preference' has no attribute {name!r}")
