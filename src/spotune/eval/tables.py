"""From per-image scores to the report's numbers: per-model summaries, categories, pairwise win rates."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

from spotune.eval.records import ImageItem, paired_keys
from spotune.eval.stats import Summary, WinRate, summarize, win_rate


@dataclass(frozen=True)
class PairResult:
    """Win rate of ``model_a`` over ``model_b`` under one scorer, on their shared prompts and seeds."""

    scorer: str
    model_a: str
    model_b: str
    result: WinRate


@dataclass
class EvalTables:
    """Everything the report shows.

    Attributes:
        models, scorers: in report order.
        items: model -> its images.
        scores: scorer -> model -> one score per image of ``items[model]`` (same order).
        summaries: (scorer, model) -> mean, std, 95% interval.
        categories: (scorer, model, category) -> summary, when the prompts carried categories.
        pairs: win rates; ``unpaired`` lists model pairs that share no prompt + seed.
    """

    models: list[str]
    scorers: list[str]
    items: dict[str, list[ImageItem]]
    scores: dict[str, dict[str, list[float]]]
    summaries: dict[tuple[str, str], Summary] = field(default_factory=dict)
    categories: dict[tuple[str, str, str], Summary] = field(default_factory=dict)
    pairs: list[PairResult] = field(default_factory=list)
    unpaired: list[tuple[str, str]] = field(default_factory=list)

    @property
    def category_names(self) -> list[str]:
        return sorted({c for (_, _, c) in self.categories})


def model_pairs(models: list[str], baseline: str = "") -> list[tuple[str, str]]:
    """(A, B) pairs to compare: every other model against ``baseline``, or every pair in order."""
    if baseline:
        if baseline not in models:
            from spotune.eval.stats import StatsError

            raise StatsError(f"baseline model '{baseline}' is not among the evaluated models {models}")
        return [(m, baseline) for m in models if m != baseline]
    # Later models against earlier ones: generate writes 'base' first, so "new vs base" reads naturally.
    return [(b, a) for a, b in combinations(models, 2)]


def build_tables(
    items: dict[str, list[ImageItem]], scores: dict[str, dict[str, list[float]]], baseline: str = ""
) -> EvalTables:
    """Summaries per (scorer, model) and per category, and win rates on identical prompts + seeds.

    Args:
        items: model -> images (from :func:`spotune.eval.records.collect_images`).
        scores: scorer -> model -> scores aligned with ``items[model]``.
        baseline: see :func:`model_pairs`.
    """
    models = list(items)
    scorers = list(scores)
    tables = EvalTables(models, scorers, items, scores)
    for scorer in scorers:
        for model in models:
            values = scores[scorer][model]
            if len(values) != len(items[model]):
                raise ValueError(f"{scorer}/{model}: {len(values)} scores for {len(items[model])} images")
            tables.summaries[(scorer, model)] = summarize(values)
            by_category: dict[str, list[float]] = {}
            for item, value in zip(items[model], values):
                if item.category:
                    by_category.setdefault(item.category, []).append(value)
            for category, cat_values in by_category.items():
                tables.categories[(scorer, model, category)] = summarize(cat_values)
    for a, b in model_pairs(models, baseline):
        keys = paired_keys(items[a], items[b])
        if not keys:
            tables.unpaired.append((a, b))
            continue
        for scorer in scorers:
            score_a = dict(zip((i.key for i in items[a]), scores[scorer][a]))
            score_b = dict(zip((i.key for i in items[b]), scores[scorer][b]))
            result = win_rate([score_a[k] for k in keys], [score_b[k] for k in keys])
            tables.pairs.append(PairResult(scorer, a, b, result))
    return tables
