"""Losses as pure functions of log-probabilities: easy to read, easy to test on hand-made tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def spo_loss(
    logp_win: torch.Tensor,
    logp_win_ref: torch.Tensor,
    logp_lose: torch.Tensor,
    logp_lose_ref: torch.Tensor,
    beta: float = 10.0,
    eps: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step-wise DPO loss of SPO with clipped likelihood ratios.

    For each tuple (x_t, x_{t-1}^w, x_{t-1}^l)::

        r_w  = clamp(exp(logp_w - logp_w_ref), 1 - eps, 1 + eps)
        r_l  = clamp(exp(logp_l - logp_l_ref), 1 - eps, 1 + eps)
        loss = -log sigmoid(beta * log r_w - beta * log r_l)

    averaged over the batch. The clamp stops the gradient once a ratio leaves [1 - eps, 1 + eps],
    which keeps the policy near the reference as PPO's clipping does.

    Args:
        logp_win, logp_win_ref: [B] log p(x_{t-1}^w | x_t) under the trained and the reference model.
        logp_lose, logp_lose_ref: [B] the same for the losing candidate.
        beta: inverse temperature of the preference (SPO: 10).
        eps: ratio clip range (SPO: 0.1).
    Returns:
        loss: scalar.
        stats: detached [B] tensors ``ratio_win``, ``ratio_lose`` and the scalar ``accuracy`` (fraction with
        r_w > r_l) for logging.
    """
    shapes = {t.shape for t in (logp_win, logp_win_ref, logp_lose, logp_lose_ref)}
    if len(shapes) != 1:
        raise ValueError(f"log-probabilities must share one shape, got {sorted(map(tuple, shapes))}")
    ratio_win = torch.clamp(torch.exp(logp_win - logp_win_ref), 1 - eps, 1 + eps)
    ratio_lose = torch.clamp(torch.exp(logp_lose - logp_lose_ref), 1 - eps, 1 + eps)
    logits = beta * (torch.log(ratio_win) - torch.log(ratio_lose))
    loss = -F.logsigmoid(logits).mean()
    stats = {
        "ratio_win": ratio_win.detach(),
        "ratio_lose": ratio_lose.detach(),
        "accuracy": (ratio_win > ratio_lose).float().mean().detach(),
    }
    return loss, stats
