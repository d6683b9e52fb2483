"""Checks of what a finished tiny run leaves for the eye: its sampling trees, metrics log and run page."""

from __future__ import annotations

import json
import math
from pathlib import Path

from spotune.recipes.run_log import read_metrics


def check_trees_and_log(run: Path, sampler: str, iterations: int) -> None:
    """The first and the last iteration recorded a tree of ``sampler`` whose rows agree with their numbers;
    the metrics log has one record per iteration with per-step statistics; the run page was written."""
    for iteration in sorted({1, iterations}):
        record = json.loads((run / "trees" / f"iter-{iteration:08d}.json").read_text())
        assert record["sampler"] == sampler and record["iteration"] == iteration
        assert (run / "trees" / record["image"]).is_file()
        judged = [row for row in record["steps"] if row["scores"] is not None]
        assert judged and len(judged[0]["scores"]) == record["candidates"]
        for row in judged:
            scores = row["scores"]
            assert scores[row["winner"]] == max(scores) and scores[row["loser"]] == min(scores)
            best, worst = max(scores), min(scores)
            gap = 1 / (1 + math.exp(worst - best)) - 1 / (1 + math.exp(best - worst))
            assert abs(row["gap"] - gap) < 1e-5
            if row["threshold"] is not None:
                assert row["kept"] == (row["gap"] > row["threshold"])
    records = read_metrics(run)
    assert [r["iteration"] for r in records] == list(range(1, iterations + 1))
    for r in records:
        per_step = r["per_step"]
        assert len(per_step["step"]) == len(per_step["pair_rate"]) == len(per_step["gap"])
        kept = sum(rate for rate in per_step["pair_rate"] if rate is not None)
        assert kept > 0  # pairs were kept (the tiny configs keep many)
    assert "spotune run page" in (run / "report.html").read_text()
