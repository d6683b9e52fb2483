"""Per-timestep statistics of one iteration: what explains a run that learns nothing.

For each denoising step index i of the round:

* ``pair_rate``: training tuples kept at step i per prompt sampled (SD1.5's sampler keeps at most one
  per prompt and step; the SDXL sampler's decisive segments give one per transition);
* ``gap``: the mean two-way softmax gap ``p_best - p_worst`` of the judged candidates at step i (the
  number the threshold is compared with), over every prompt, kept or not;
* ``log_ratio_win`` / ``log_ratio_lose``: the mean policy-minus-reference log-likelihood of the winners'
  and the losers' steps among the tuples trained on at step i (unclipped; the loss clips the ratios);
* ``threshold``: the gap a pair had to exceed at step i, where the sampler says (LPO's depends on the step).

Counts and sums are kept per step, on the device the tensors come from (the training loop never waits
for the device because of them), and added across processes before the means are taken, so the figures
are the whole round's under ``accelerate launch``.
"""

from __future__ import annotations

import math

import torch

from spotune.preference.select import best_worst_gap

STATISTICS: tuple[str, ...] = ("pair_rate", "gap", "log_ratio_win", "log_ratio_lose", "threshold")


class StepStatistics:
    """Accumulates one iteration's per-step counts and sums (``add_sampling``, ``add_training``), then ``finish``.

    Args:
        num_steps: N, the sampler's denoising steps (step indices 0 .. N-1).
        first_step: the first step index reported (``divert_start_step``: no pair exists before it).
        device: where the sums live (the accelerator's device), read once by :meth:`finish`.
    """

    def __init__(self, num_steps: int, first_step: int = 0, device: torch.device | str | None = None) -> None:
        self.num_steps = num_steps
        self.first_step = first_step
        # Rows: kept tuples, prompts, gap sum, gap count, win log-ratio sum, lose log-ratio sum, trained count.
        self.sums = torch.zeros(7, num_steps, dtype=torch.float64, device=device)
        self.thresholds: dict[int, float] = {}  # step -> the threshold its pairs were held to

    def add_sampling(self, step_index: torch.Tensor, judged_steps: list[int], scores: torch.Tensor, num_prompts: int,
                     thresholds: list[float | None] | None = None) -> None:
        """A sampling round's kept tuples ([n] long ``step_index``), its [S, k, b] ``scores`` at ``judged_steps`` and,
        when the sampler reports them, the S thresholds (the same on every process and round)."""
        for step, value in zip(judged_steps, thresholds or []):
            if value is not None:
                self.thresholds[step] = float(value)
        self._add(0, step_index, None)
        self.sums[1] += num_prompts
        if judged_steps:
            s, k, b = scores.shape
            _, gap = best_worst_gap(scores.float().permute(1, 0, 2).reshape(k, s * b))  # [S*b], step-major
            steps = torch.as_tensor(judged_steps, device=self.sums.device).repeat_interleave(b)
            self._add(2, steps, gap)
            self._add(3, steps, None)

    def add_training(self, step_index: torch.Tensor, log_ratio_win: torch.Tensor, log_ratio_lose: torch.Tensor) -> None:
        """One micro-batch's [n] step indices and [n] log-ratios of its winners' and losers' steps."""
        self._add(4, step_index, log_ratio_win)
        self._add(5, step_index, log_ratio_lose)
        self._add(6, step_index, None)

    def _add(self, row: int, step_index: torch.Tensor, values: torch.Tensor | None) -> None:
        """Add [n] ``values`` (ones when ``None``) into ``sums[row]`` at their [n] step indices, on the device."""
        index = step_index.reshape(-1).to(self.sums.device)
        values = torch.ones_like(index, dtype=torch.float64) if values is None else values.detach().reshape(-1).double()
        self.sums[row].index_add_(0, index, values.to(self.sums.device))

    def finish(self, accelerator=None) -> dict[str, list]:
        """``{"step": [i, ...], "pair_rate": [...], "gap": [...], "log_ratio_win": [...], "log_ratio_lose": [...]}``
        for steps ``first_step`` .. N-1; ``None`` where a step has nothing to average. Every process must call it
        when more than one runs (the sums are added across them)."""
        sums = self.sums
        if accelerator is not None and accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum")
        sums = sums.cpu()

        def ratio(num: torch.Tensor, den: torch.Tensor) -> list[float | None]:
            return [float(n / d) if d > 0 and math.isfinite(float(n / d)) else None for n, d in zip(num.tolist(), den.tolist())]

        steps = slice(self.first_step, self.num_steps)
        return {
            "step": list(range(self.first_step, self.num_steps)),
            "pair_rate": ratio(sums[0, steps], sums[1, steps]),
            "gap": ratio(sums[2, steps], sums[3, steps]),
            "log_ratio_win": ratio(sums[4, steps], sums[6, steps]),
            "log_ratio_lose": ratio(sums[5, steps], sums[6, steps]),
            "threshold": [self.thresholds.get(step) for step in range(self.first_step, self.num_steps)],
        }


def tracker_scalars(per_step: dict[str, list]) -> dict[str, float]:
    """The per-step statistics as flat tracker scalars, ``per_step/<name>/step_XX`` (missing values left out)."""
    out = {}
    for name in STATISTICS:
        for step, value in zip(per_step["step"], per_step[name]):
            if value is not None:
                out[f"per_step/{name}/step_{step:02d}"] = value
    return out
