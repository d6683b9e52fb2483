"""Losses as pure functions of log-probabilities or noise predictions: easy to read, easy to test on hand-made tensors."""

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
    return clipped_ratio_dpo(logp_win - logp_win_ref, logp_lose - logp_lose_ref, beta, eps)


def clipped_ratio_dpo(
    log_ratio_win: torch.Tensor, log_ratio_lose: torch.Tensor, beta: float, eps: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss with clipped likelihood ratios that SPO and GradSPO share.

    ``r = clamp(exp(log_ratio), 1 - eps, 1 + eps)``, ``loss = -mean log sigmoid(beta (log r_w - log r_l))``.

    Args:
        log_ratio_win, log_ratio_lose: [B] policy-minus-reference log-likelihoods of winner and loser.
    Returns:
        (loss, stats) with detached [B] ``ratio_win``, ``ratio_lose`` (clipped), ``log_ratio_win``,
        ``log_ratio_lose`` (as given) and the scalar ``accuracy``.
    """
    ratio_win = torch.clamp(torch.exp(log_ratio_win), 1 - eps, 1 + eps)
    ratio_lose = torch.clamp(torch.exp(log_ratio_lose), 1 - eps, 1 + eps)
    logits = beta * (torch.log(ratio_win) - torch.log(ratio_lose))
    loss = -F.logsigmoid(logits).mean()
    stats = {
        "ratio_win": ratio_win.detach(),
        "ratio_lose": ratio_lose.detach(),
        "accuracy": (ratio_win > ratio_lose).float().mean().detach(),
        # Unclipped, per tuple: the per-step statistics average them by step (recipes/step_stats.py).
        "log_ratio_win": log_ratio_win.detach(),
        "log_ratio_lose": log_ratio_lose.detach(),
    }
    return loss, stats


def gradspo_loss(
    eps_policy: torch.Tensor,
    eps_ref: torch.Tensor,
    eps_ema: torch.Tensor,
    delta: torch.Tensor,
    alphas_cumprod_t: torch.Tensor,
    beta: float = 10.0,
    eps: float = 0.1,
    grad_scale: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GradSPO's loss: SPO's clipped DPO form on noise-prediction targets instead of step densities.

    Winner and loser of a tuple share x_t, t and the prompt, so one policy, one reference and one EMA
    prediction serve both. With ``a = sqrt(1 - alphabar_t)`` and ``s = grad_scale``::

        eps*_w = eps_ema - s * a * delta          eps*_l = eps_ema + s * a * delta
        l_m^j  = -mean_{C,H,W} (eps_m - eps*_j)^2 for m in {policy, ref}, j in {w, l}
        r_j    = clamp(exp(l_policy^j - l_ref^j), 1 - eps, 1 + eps)
        loss   = -log sigmoid(beta * log r_w - beta * log r_l)

    averaged over the batch. ``delta = (z_best - z_worst) / 2`` comes from the standard-normal draws
    behind the two candidates, so the targets move the EMA's prediction a little towards the noise that
    made the winner and away from the one that made the loser. The targets carry no gradient.

    Args:
        eps_policy: [B, C, H, W] guided epsilon prediction of the trained model at (x_t, t).
        eps_ref: [B, C, H, W] the same from the frozen reference.
        eps_ema: [B, C, H, W] the same from the EMA model (the one that sampled the tuples).
        delta: [B, C, H, W] the winner's offset; the loser's is ``-delta``.
        alphas_cumprod_t: [B] alphabar at each tuple's t.
        beta: inverse temperature (GradSPO: 10).
        eps: ratio clip range (GradSPO: 0.1).
        grad_scale: s, the step of the targets along delta (GradSPO: 0.5).
    Returns:
        loss: scalar.
        stats: detached ``ratio_win``, ``ratio_lose`` [B] and the scalar ``accuracy`` (fraction with r_w > r_l).
    """
    shapes = {tuple(t.shape) for t in (eps_policy, eps_ref, eps_ema, delta)}
    if len(shapes) != 1:
        raise ValueError(f"noise predictions and delta must share one shape, got {sorted(shapes)}")
    if alphas_cumprod_t.shape != eps_policy.shape[:1]:
        raise ValueError(f"alphas_cumprod_t must be [{eps_policy.shape[0]}], got {tuple(alphas_cumprod_t.shape)}")
    a = (1 - alphas_cumprod_t.float()).sqrt().reshape(-1, *([1] * (eps_policy.dim() - 1)))  # [B, 1, 1, 1]
    step = (grad_scale * a * delta.float()).detach()
    target_win = eps_ema.float().detach() - step
    target_lose = eps_ema.float().detach() + step
    dims = tuple(range(1, eps_policy.dim()))

    def neg_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -((pred.float() - target) ** 2).mean(dim=dims)  # [B]

    return clipped_ratio_dpo(
        neg_mse(eps_policy, target_win) - neg_mse(eps_ref, target_win),
        neg_mse(eps_policy, target_lose) - neg_mse(eps_ref, target_lose),
        beta, eps,
    )
