"""Per-step statistics on hand-made numbers: counts, gaps and log-ratios land on their step index."""

import math

import torch
from pytest import approx

from spotune.recipes.step_stats import StepStatistics, tracker_scalars


def test_rates_gaps_and_log_ratios_by_step():
    stats = StepStatistics(num_steps=5, first_step=2)
    # 2 prompts; judged at steps 2, 3, 4; tuples kept: step 2 twice, step 4 once.
    scores = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])  # [S=3, k=2, b=2]
    stats.add_sampling(torch.tensor([2, 2, 4]), [2, 3, 4], scores, num_prompts=2)
    stats.add_training(torch.tensor([2, 4]), torch.tensor([0.5, -1.0]), torch.tensor([0.1, 0.3]))
    stats.add_training(torch.tensor([2]), torch.tensor([1.5]), torch.tensor([-0.1]))
    out = stats.finish()
    assert out["step"] == [2, 3, 4]
    assert out["pair_rate"] == [1.0, 0.0, 0.5]
    gap1 = math.tanh(0.5)  # softmax(1, 0): p_best - p_worst = tanh(d / 2)
    assert out["gap"] == [approx((0.0 + gap1) / 2), approx(math.tanh(1.0) / 2), 0.0]
    assert out["log_ratio_win"] == [approx(1.0), None, approx(-1.0)]
    assert out["log_ratio_lose"] == [approx(0.0), None, approx(0.3)]
    scalars = tracker_scalars(out)
    assert scalars["per_step/pair_rate/step_04"] == 0.5 and "per_step/log_ratio_win/step_03" not in scalars
