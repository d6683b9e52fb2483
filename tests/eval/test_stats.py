"""Confidence intervals, win rates and the report tables on hand-made numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from spotune.eval.records import ImageItem
from spotune.eval.stats import StatsError, student_t_cdf, student_t_quantile, summarize, win_rate
from spotune.eval.tables import build_tables, model_pairs


@pytest.mark.parametrize(
    "df, expected",  # two-sided 95% critical values from any t table
    [(1, 12.7062), (2, 4.3027), (5, 2.5706), (9, 2.2622), (19, 2.0930), (30, 2.0423), (120, 1.9799)],
)
def test_t_quantile_matches_tables(df, expected):
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


# Quantiles of the continued-fraction implementation scipy.stats replaced (rounded to 1e-10): the
# evaluation's intervals did not move.
HAND_ROLLED_QUANTILES = {
    0.9: (3.0776835372, 1.8856180832, 1.6377443537, 1.4758840488, 1.3830287384, 1.327728209, 1.3104150254, 1.2886462337, 1.2823987215),
    0.95: (6.3137515147, 2.9199855804, 2.3533634348, 2.0150483733, 1.8331129327, 1.7291328115, 1.6972608866, 1.6576508994, 1.6463788173),
    0.975: (12.7062047362, 4.3026527297, 3.1824463053, 2.5705818356, 2.2621571628, 2.0930240544, 2.0422724563, 1.9799304051, 1.9623390808),
    0.995: (63.6567411628, 9.9248432009, 5.8409093097, 4.0321429836, 3.2498355416, 2.8609346065, 2.7499956536, 2.6174211451, 2.5807546981),
    0.9995: (636.6192487685, 31.5990545764, 12.9239786367, 6.8688266259, 4.7809125859, 3.8834058526, 3.645958635, 3.3734537686, 3.3002826484),
}
HAND_ROLLED_DFS = (1, 2, 3, 5, 9, 19, 30, 120, 1000)


def test_t_quantiles_equal_the_hand_rolled_ones_scipy_replaced():
    for p, values in HAND_ROLLED_QUANTILES.items():
        for df, expected in zip(HAND_ROLLED_DFS, values):
            assert student_t_quantile(p, df) == pytest.approx(expected, rel=1e-9, abs=1e-9), (p, df)


def test_t_cdf_symmetry_and_cauchy_case():
    assert student_t_cdf(0.0, 7) == pytest.approx(0.5)
    # df = 1 is the Cauchy distribution: CDF(t) = 1/2 + atan(t) / pi.
    for t in (-3.0, -0.5, 0.7, 4.0):
        assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-10)
    assert student_t_quantile(0.025, 9) == pytest.approx(-student_t_quantile(0.975, 9))


def test_summarize_hand_made():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt(5.0 / 3.0)  # sum of squared deviations 5, over n - 1 = 3
    half = 3.182446 * std / 2.0  # t(0.975, 3) * std / sqrt(4)
    assert (s.n, s.mean, s.std) == (4, 2.5, pytest.approx(std))
    assert s.ci_low == pytest.approx(2.5 - half, abs=1e-5)
    assert s.ci_high == pytest.approx(2.5 + half, abs=1e-5)


def test_summarize_single_value_and_bad_input():
    s = summarize([7.0])
    assert s.mean == 7.0 and math.isnan(s.std) and math.isnan(s.ci_low)
    with pytest.raises(StatsError):
        summarize([])
    with pytest.raises(StatsError, match="NaN"):
        summarize([1.0, float("nan")])


def test_win_rate_hand_made():
    # 14 wins and 6 losses in 20 pairs: rate 0.7, outcome std sqrt(20 * 0.21 / 19).
    a = [2.0] * 14 + [0.0] * 6
    b = [1.0] * 20
    r = win_rate(a, b)
    half = 2.093024 * math.sqrt(20 * 0.21 / 19) / math.sqrt(20)
    assert (r.n, r.wins, r.ties, r.losses) == (20, 14, 0, 6)
    assert r.rate == pytest.approx(0.7)
    assert r.ci_low == pytest.approx(0.7 - half, abs=1e-5)
    assert r.ci_high == pytest.approx(0.7 + half, abs=1e-5)
    # Swapping the models swaps wins and losses; the rates add up to one.
    assert win_rate(b, a).rate == pytest.approx(0.3)


def test_win_rate_ties_count_half_and_float_noise_is_a_tie():
    r = win_rate([3.0, 1.0, 2.0, 5.0], [1.0, 2.0, 2.0, 4.0])
    assert (r.wins, r.ties, r.losses) == (2, 1, 1) and r.rate == pytest.approx(0.625)
    noisy = win_rate([37.024395], [37.024399])  # the same image scored in two batch sizes
    assert noisy.ties == 1 and noisy.rate == 0.5
    assert win_rate([37.024395], [37.024399], tie_tolerance=0.0).losses == 1
    assert 0.0 <= win_rate([1.0, 0.0], [0.0, 1.0]).ci_low  # clipped to [0, 1]


def test_win_rate_bad_input():
    with pytest.raises(StatsError, match="length"):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(StatsError):
        win_rate([], [])
    with pytest.raises(StatsError, match="NaN"):
        win_rate([float("nan")], [1.0])


def _items(model: str, rows: list[tuple[str, str, int, str | None]]) -> list[ImageItem]:
    return [ImageItem(model, key, Path(f"{model}/{key}.png"), prompt, seed, cat) for key, prompt, seed, cat in rows]


def test_tables_pair_only_identical_prompts_and_seeds():
    items = {
        "base": _items("base", [("k0", "cat", 1, "animals"), ("k1", "dog", 2, "animals"), ("k2", "car", 3, "vehicles"),
                                ("k3", "boat", 4, "vehicles")]),
        "spo": _items("spo", [("k0", "cat", 1, "animals"), ("k1", "dog", 99, "animals"), ("k2", "car", 3, "vehicles"),
                              ("k3", "ship", 4, "vehicles")]),
    }
    scores = {"s": {"base": [1.0, 1.0, 5.0, 1.0], "spo": [2.0, 9.0, 4.0, 9.0]}}
    tables = build_tables(items, scores)
    # k1 differs in seed and k3 in prompt: only k0 (spo wins) and k2 (spo loses) are compared.
    (pair,) = tables.pairs
    assert (pair.model_a, pair.model_b) == ("spo", "base")
    assert (pair.result.n, pair.result.wins, pair.result.losses) == (2, 1, 1)
    assert tables.summaries[("s", "spo")].mean == pytest.approx(6.0)
    assert tables.categories[("s", "base", "vehicles")].mean == pytest.approx(3.0)
    assert tables.category_names == ["animals", "vehicles"]


def test_tables_unpaired_models_and_baseline():
    items = {"a": _items("a", [("k0", "cat", 1, None)]), "b": _items("b", [("x", "cat", 1, None)]),
             "c": _items("c", [("k0", "cat", 1, None)])}
    scores = {"s": {"a": [1.0], "b": [2.0], "c": [0.0]}}
    tables = build_tables(items, scores, baseline="a")
    assert [(p.model_a, p.model_b) for p in tables.pairs] == [("c", "a")]
    assert tables.unpaired == [("b", "a")]
    assert model_pairs(["a", "b", "c"]) == [("b", "a"), ("c", "a"), ("c", "b")]
    with pytest.raises(StatsError, match="baseline"):
        model_pairs(["a", "b"], baseline="zzz")


# -- the two-level (seeds x images) bootstrap -------------------------------------------------------


def test_two_level_bootstrap_of_identical_seeds_is_the_one_level_image_bootstrap():
    from spotune.eval.stats import bootstrap_mean, two_level_bootstrap

    row = [1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0, 0.5, 1.0, 1.0]
    one = bootstrap_mean(row, resamples=500, seed=3)
    three = two_level_bootstrap([row, row, row], resamples=500, seed=3)
    assert (three.mean, three.ci_low, three.ci_high) == (one.mean, one.ci_low, one.ci_high)
    assert three.seeds == 3 and three.images == 10 and three.seed_means == [0.7, 0.7, 0.7]
    single = two_level_bootstrap([row], resamples=500, seed=3)
    assert (single.ci_low, single.ci_high) == (one.ci_low, one.ci_high)


def test_two_level_bootstrap_known_cases():
    from spotune.eval.stats import two_level_bootstrap

    # Constant values: no spread at either level.
    flat = two_level_bootstrap([[0.5] * 4] * 3, resamples=200)
    assert (flat.mean, flat.ci_low, flat.ci_high) == (0.5, 0.5, 0.5)
    # One seed always wins, one always loses: the resampled mean is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4,
    # so the 95% interval spans [0, 1] although every seed's images agree among themselves.
    split = two_level_bootstrap([[1.0] * 8, [0.0] * 8], resamples=4000)
    assert split.mean == 0.5 and (split.ci_low, split.ci_high) == (0.0, 1.0)
    # Seed spread widens the interval beyond the images' alone.
    rows = [[1, 1, 1, 0, 1, 1, 0, 1], [0, 1, 0, 0, 1, 0, 0, 1], [1, 1, 1, 1, 1, 0, 1, 1]]
    pooled = two_level_bootstrap(rows, resamples=2000)
    images_only = two_level_bootstrap([[sum(c) / 3 for c in zip(*rows)]] * 3, resamples=2000)
    assert pooled.mean == pytest.approx(images_only.mean)
    assert pooled.ci_high - pooled.ci_low > images_only.ci_high - images_only.ci_low
    assert pooled.ci_low <= pooled.mean <= pooled.ci_high


def test_two_level_bootstrap_refuses_ragged_or_empty_tables():
    from spotune.eval.stats import StatsError, two_level_bootstrap

    with pytest.raises(StatsError, match="same images"):
        two_level_bootstrap([[1.0, 0.0], [1.0]])
    with pytest.raises(StatsError, match="at least one"):
        two_level_bootstrap([])
    with pytest.raises(StatsError, match="NaN"):
        two_level_bootstrap([[float("nan")]])


def test_two_level_bootstrap_leaves_missing_values_out_when_asked():
    from spotune.eval.stats import StatsError, two_level_bootstrap

    nan = float("nan")
    with pytest.raises(StatsError, match="NaN"):
        two_level_bootstrap([[1.0, nan]])
    result = two_level_bootstrap([[2.0, nan, 2.0], [4.0, 4.0, nan]], resamples=500, missing=True)
    assert result.mean == pytest.approx(3.0) and result.seed_means == [2.0, 4.0]
    assert 2.0 <= result.ci_low <= 3.0 <= result.ci_high <= 4.0
