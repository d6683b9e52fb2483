"""Measurement: image scorers, score statistics (means, 95% intervals, win rates) and reports.

``get_scorer(name, **paths)`` builds a scorer ``scorer(images: list[PIL.Image], prompts: list[str])
-> torch.Tensor`` (one score per image) from local weights; see :mod:`spotune.eval.scorers`.
"""

from spotune.eval.scorers import SCORER_NAMES, MissingWeightError, Scorer, ScorerError, get_scorer
from spotune.eval.stats import Summary, WinRate, summarize, win_rate

__all__ = [
    "SCORER_NAMES",
    "MissingWeightError",
    "Scorer",
    "ScorerError",
    "Summary",
    "WinRate",
    "get_scorer",
    "summarize",
    "win_rate",
]
