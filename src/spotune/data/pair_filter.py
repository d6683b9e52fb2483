"""LPO's label filter for latent reward model training (the paper's MPCF; ``filter_strategy`` in the authors'
``lrm/lrm_15/trainer/datasets/step_sd_hf_dataset.py``).

The authors score every training pair with three other judges (an aesthetic predictor, CLIP, VQAScore) and
keep a pair only when those judges do not contradict its label. Their CSV has one row per row of the training
split, in order, with the columns ``different_flag`` (1: the pair has a preferred image, 0: a tie) and the
three score gaps ``aesthetic_gap``, ``clipscore_gap``, ``vqascore_gap`` (preferred minus rejected for a
decisive pair; the absolute gap for a tie). The rule keeps

* a decisive pair (flag 1) when ``aesthetic_gap > A`` and ``clipscore_gap > 0`` and ``vqascore_gap > 0``,
  with A = 0 (strategy 1), -0.5 (strategy 2, the released LRMs') or -1 (strategy 3);
* a tie (flag 0) when ``aesthetic_gap < 0.2`` and ``clipscore_gap < 0.03`` and ``vqascore_gap < 0.07``;

and drops every other row (an empty or non-numeric cell compares false, as the authors' pandas does with NaN).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from spotune.errors import SpotuneError

MPCF_COLUMNS = ("different_flag", "aesthetic_gap", "clipscore_gap", "vqascore_gap")
# filter_strategy -> the least aesthetic gap a decisive pair may have.
DECISIVE_MIN_AESTHETIC_GAP = {1: 0.0, 2: -0.5, 3: -1.0}
# The largest aesthetic, CLIP and VQA gaps of a tie that is kept (the same in every strategy).
TIE_MAX_GAPS = (0.2, 0.03, 0.07)


class PairFilterError(SpotuneError, ValueError):
    """A filter CSV that cannot be read or does not fit the training data (file and row or column named)."""


def _number(cell: str | None) -> float:
    try:
        return float(cell) if cell not in (None, "") else math.nan
    except ValueError:
        return math.nan


def mpcf_keep(path: str | Path, strategy: int = 2) -> np.ndarray:
    """[N] bool: which rows of the training data the filter CSV ``path`` keeps under ``strategy`` (1, 2 or 3)."""
    if strategy not in DECISIVE_MIN_AESTHETIC_GAP:
        raise PairFilterError(f"pair_filter_strategy must be 1, 2 or 3 (the authors' filter_strategy), got {strategy}")
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # a spreadsheet's byte-order mark is not a column
            reader = csv.DictReader(handle)
            missing = [c for c in MPCF_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise PairFilterError(f"{path}: no column {', '.join(missing)}; pair_filter_csv needs the columns "
                                      f"{', '.join(MPCF_COLUMNS)} (the LPO authors' pseudo-preference CSV)")
            rows = np.array([[_number(row[c]) for c in MPCF_COLUMNS] for row in reader], dtype=np.float64).reshape(-1, 4)
    except OSError as exc:
        raise PairFilterError(f"pair_filter_csv={path}: cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise PairFilterError(f"pair_filter_csv={path}: not a UTF-8 CSV file ({exc})") from None
    flag, aesthetic, clip, vqa = rows.T
    with np.errstate(invalid="ignore"):
        decisive = (flag == 1) & (aesthetic > DECISIVE_MIN_AESTHETIC_GAP[strategy]) & (clip > 0) & (vqa > 0)
        tie = (flag == 0) & (aesthetic < TIE_MAX_GAPS[0]) & (clip < TIE_MAX_GAPS[1]) & (vqa < TIE_MAX_GAPS[2])
    return decisive | tie
