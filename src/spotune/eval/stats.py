"""Summary statistics of scores: mean, spread, 95% confidence intervals, pairwise win rates.

The confidence interval of a mean uses Student's t distribution with n - 1 degrees of freedom (exact for
normal scores, and close to the normal 1.96 rule once n is a few dozen), from ``scipy.stats.t``. The
rest is plain Python on lists of floats, so the maths can be checked on hand-made numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from spotune.errors import SpotuneError


class StatsError(SpotuneError, ValueError):
    """Scores that cannot be summarised (for example two score lists of different lengths)."""


# -- Student's t distribution --------------------------------------------------------------------


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t as student_t

    if df <= 0:
        raise StatsError(f"degrees of freedom must be positive, got {df}")
    return float(student_t.cdf(t, df))


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (for example p = 0.975 gives the two-sided 95% critical value)."""
    from scipy.stats import t as student_t

    if not 0.0 < p < 1.0:
        raise StatsError(f"a quantile needs 0 < p < 1, got {p}")
    if df <= 0:
        raise StatsError(f"degrees of freedom must be positive, got {df}")
    return float(student_t.ppf(p, df))


# -- summaries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Mean of ``n`` scores with its sample standard deviation and a two-sided confidence interval.

    ``std`` uses n - 1 in the denominator; ``ci_low`` / ``ci_high`` are mean -/+ t * std / sqrt(n).
    With a single score the spread is unknown: std and the interval are NaN.
    """

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean, sample std and the Student-t confidence interval of the mean.

    Args:
        values: the scores (at least one; NaN is refused so that a broken image is never averaged in).
        confidence: two-sided coverage of the interval (0.95 for a 95% interval).
    """
    xs = [float(v) for v in values]
    if not xs:
        raise StatsError("cannot summarise an empty list of scores")
    if any(math.isnan(v) for v in xs):
        raise StatsError("scores contain NaN; a scorer failed on some image")
    if not 0.0 < confidence < 1.0:
        raise StatsError(f"confidence must lie in (0, 1), got {confidence}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        nan = float("nan")
        return Summary(n, mean, nan, nan, nan, confidence)
    var = math.fsum((v - mean) ** 2 for v in xs) / (n - 1)
    std = math.sqrt(var)
    t = student_t_quantile(0.5 + confidence / 2.0, n - 1)
    half = t * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, confidence)


@dataclass(frozen=True)
class WinRate:
    """How often model A scored higher than model B on the same prompt and seed.

    ``rate`` counts a tie as half a win (so A vs B and B vs A add up to 1). ``ci_low`` / ``ci_high``
    are the Student-t interval of the mean of the per-pair outcomes (1, 0.5 or 0), clipped to [0, 1]
    (NaN with a single pair).
    """

    n: int
    wins: int
    ties: int
    losses: int
    rate: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


DEFAULT_TIE_TOLERANCE = 1e-5


def win_rate(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    confidence: float = 0.95,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
) -> WinRate:
    """Win rate of A over B on paired scores (element i of both lists: the same prompt and seed).

    Scores within ``tie_tolerance * max(1, |a|, |b|)`` of each other are a tie: the same image scored
    in batches of different sizes differs in the last float32 digits, which is no preference.

    Args:
        scores_a, scores_b: [n] paired scores.
        confidence: two-sided coverage of the interval.
        tie_tolerance: relative tolerance for ties (0: exact comparison).
    """
    if len(scores_a) != len(scores_b):
        raise StatsError(f"paired scores differ in length: {len(scores_a)} vs {len(scores_b)}")
    if not scores_a:
        raise StatsError("no paired scores to compare")
    outcomes = []
    wins = ties = losses = 0
    for a, b in zip(scores_a, scores_b):
        if abs(a - b) <= tie_tolerance * max(1.0, abs(a), abs(b)):
            ties += 1
            outcomes.append(0.5)
        elif a > b:
            wins += 1
            outcomes.append(1.0)
        elif a < b:
            losses += 1
            outcomes.append(0.0)
        else:  # NaN on either side
            raise StatsError("paired scores contain NaN; a scorer failed on some image")
    summary = summarize(outcomes, confidence)
    # A rate lives in [0, 1]; the t interval of a few outcomes can reach past it, so it is clipped.
    low, high = max(0.0, summary.ci_low), min(1.0, summary.ci_high)
    return WinRate(len(outcomes), wins, ties, losses, summary.mean, low, high)


# -- bootstrap over training seeds and images ---------------------------------------------------


@dataclass(frozen=True)
class BootstrapInterval:
    """A mean over a [seeds, images] table with a percentile bootstrap interval.

    ``mean`` is the plain mean of the table; ``ci_low`` / ``ci_high`` are the (1 - confidence) / 2 and
    (1 + confidence) / 2 quantiles of the resampled means; ``seed_means`` the per-seed means.
    """

    mean: float
    ci_low: float
    ci_high: float
    seeds: int
    images: int
    resamples: int
    seed_means: list[float]
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def two_level_bootstrap(
    table: Sequence[Sequence[float]],
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    missing: bool = False,
) -> BootstrapInterval:
    """Interval of a mean across training seeds and evaluation images, both resampled.

    ``table[s][i]`` is the value (e.g. a same-seed win outcome 1 / 0.5 / 0) of image i for the model
    trained with seed s. Images are the same prompts and evaluation seeds for every training seed, so
    the two factors are crossed: each resample draws the training seeds with replacement (level one)
    and, independently, the images with replacement (level two), the same image draw for every drawn
    seed, and takes the mean of the resampled table. The seeds and the images are drawn from two
    generators of their own (seeded ``seed`` and ``seed + 1``), so a table whose rows are all equal
    gives exactly :func:`bootstrap_mean` of one row, the one-level image bootstrap, and a table with
    one image per seed gives the seed bootstrap.

    Args:
        table: [S, I] values, S >= 1 training seeds, I >= 1 images, every row the same length.
        confidence: two-sided coverage of the percentile interval.
        resamples: bootstrap resamples.
        seed: seed of the resampling (the interval is reproducible).
        missing: NaN marks a missing value (e.g. a subject's position when an image shows none), left
            out of every mean; otherwise NaN is refused.
    """
    import numpy as np

    x = _table(table, missing)
    if not 0.0 < confidence < 1.0:
        raise StatsError(f"confidence must lie in (0, 1), got {confidence}")
    if resamples < 1:
        raise StatsError(f"resamples must be >= 1, got {resamples}")
    s, n = x.shape
    seed_rng, image_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # chunks keep the [r, S, I] index tensor small
        r = min(256, resamples - start)
        rows = seed_rng.integers(0, s, size=(r, s))  # [r, S]
        cols = image_rng.integers(0, n, size=(r, n))  # [r, I]
        picked = x[rows[:, :, None], cols[:, None, :]]  # [r, S, I]
        means[start : start + r] = _nanmean(picked, axis=(1, 2)) if missing else picked.mean(axis=(1, 2))
    return _interval(x, means, confidence, resamples)


def _nanmean(x, axis):
    """Mean over the non-NaN values (NaN where there are none), without numpy's empty-slice warning."""
    import numpy as np

    count = (~np.isnan(x)).sum(axis=axis)
    total = np.nansum(x, axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def bootstrap_mean(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> BootstrapInterval:
    """The one-level percentile bootstrap of a mean of ``values`` (images resampled with replacement),
    drawn as :func:`two_level_bootstrap` draws its images."""
    import numpy as np

    x = _table([values])
    image_rng = np.random.default_rng(seed + 1)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):
        r = min(256, resamples - start)
        cols = image_rng.integers(0, x.shape[1], size=(r, x.shape[1]))
        means[start : start + r] = x[0][cols].mean(axis=1)
    return _interval(x, means, confidence, resamples)


def _table(table: Sequence[Sequence[float]], missing: bool = False):
    import numpy as np

    rows = [list(map(float, row)) for row in table]
    if not rows or not rows[0]:
        raise StatsError("a bootstrap needs at least one seed and one image")
    if len({len(row) for row in rows}) != 1:
        raise StatsError(f"every seed needs the same images; row lengths {[len(r) for r in rows]}")
    x = np.array(rows, dtype=np.float64)
    if np.isnan(x).all() or (np.isnan(x).any() and not missing):
        raise StatsError("values contain NaN; a scorer failed on some image")
    return x


def _interval(x, means, confidence: float, resamples: int) -> BootstrapInterval:
    import numpy as np

    tail = (1.0 - confidence) / 2.0
    kept = means[~np.isnan(means)]  # a resample that drew only missing values has no mean
    low, high = np.quantile(kept, [tail, 1.0 - tail])
    return BootstrapInterval(float(_nanmean(x, (0, 1))), float(low), float(high), x.shape[0], x.shape[1], resamples,
                             [float(v) for v in _nanmean(x, 1)], confidence)
