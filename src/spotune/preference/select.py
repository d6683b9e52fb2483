"""Choosing the win/lose pair among the k candidates of one denoising step (SPO, Sec. 4)."""

from __future__ import annotations

import torch


def select_pair(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the best and worst of k candidates per prompt and say whether the pair is decisive.

    The best and worst scores go through a two-way softmax; the pair is kept when
    ``p_best - p_worst > threshold``, so near-ties (where the judge is guessing) are dropped.

    Args:
        scores: [k, b] preference scores of k candidates for each of b prompts.
        threshold: minimum gap between the two softmax probabilities (SPO: 0.3 for SD1.5).
    Returns:
        indices: [2, b] long; row 0 the best candidate's index, row 1 the worst's.
        valid: [b] bool; True where the pair is decisive enough to train on.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [k, b], got shape {tuple(scores.shape)}")
    if scores.shape[0] < 2:
        raise ValueError(f"need at least 2 candidates per prompt to form a pair, got k={scores.shape[0]}")
    indices, gap = best_worst_gap(scores)
    return indices, gap > threshold


def best_worst_gap(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The best and worst of k candidates per prompt and their two-way softmax gap ``p_best - p_worst``.

    Args:
        scores: [k, b] preference scores (k >= 2).
    Returns:
        indices: [2, b] long, the best's and the worst's index; gap: [b] float32 in [0, 1).
    """
    order = torch.argsort(scores, dim=0, descending=True)  # [k, b]
    best, worst = order[0], order[-1]  # [b], [b]
    pair_scores = torch.stack([scores.gather(0, best[None])[0], scores.gather(0, worst[None])[0]])  # [2, b]
    probs = torch.softmax(pair_scores.float(), dim=0)  # [2, b]
    return torch.stack([best, worst]), probs[0] - probs[1]


def sigma_threshold(scheduler, timesteps: torch.Tensor, low: float, high: float, eta: float = 1.0) -> torch.Tensor:
    """LPO's timestep-dependent pair threshold: ``low + (high - low) * (s_t - s_min) / (s_max - s_min)``.

    s_t is the standard deviation of the DDIM step leaving t (``eta`` 1, as LPO samples), and s_min, s_max
    are its extremes over the scheduler's current schedule (call ``set_timesteps`` first), so the noisiest
    step asks for ``high`` and the last for ``low``: the latent judge is less sure where the noise is large.
    LPO's code hard-codes the values for 20 steps (SD1.5 0.35 -> 0.5); this computes them for any schedule.

    Args:
        scheduler: a DDIM scheduler with its timesteps set.
        timesteps: [n] (or scalar) timesteps of the steps whose candidates are judged.
        low, high: the threshold at the least and the most noisy step.
    Returns:
        [n] float32 thresholds.
    """
    from spotune.diffusion.ddim import ddim_step_std

    every = ddim_step_std(scheduler, scheduler.timesteps, eta)
    s_min, s_max = every.min(), every.max()
    s_t = ddim_step_std(scheduler, timesteps, eta)
    if float(s_max - s_min) <= 0:  # a one-step schedule: nothing to interpolate between
        return torch.full_like(s_t, high)
    return low + (high - low) * (s_t - s_min) / (s_max - s_min)
