"""gradspo_loss on hand-made noise predictions, against the formula written out here."""

import math

import pytest
import torch

from spotune.losses import gradspo_loss


def _expected(pol, ref, ema, delta, abar, beta, eps, s):
    """The formula with plain Python floats, one tuple: lists of per-element values."""
    a = math.sqrt(1 - abar)
    tw = [e - s * a * d for e, d in zip(ema, delta)]
    tl = [e + s * a * d for e, d in zip(ema, delta)]
    mse = lambda x, t: sum((xi - ti) ** 2 for xi, ti in zip(x, t)) / len(x)
    clamp = lambda r: min(max(r, 1 - eps), 1 + eps)
    rw = clamp(math.exp(-mse(pol, tw) + mse(ref, tw)))
    rl = clamp(math.exp(-mse(pol, tl) + mse(ref, tl)))
    logit = beta * math.log(rw) - beta * math.log(rl)
    return math.log1p(math.exp(-logit)), rw, rl  # -log sigmoid(x) = log(1 + e^-x)


def test_matches_the_written_formula_on_two_tuples():
    # [B=2, C=1, H=1, W=2]
    pol = [[0.30, -0.10], [0.05, 0.20]]
    ref = [[0.25, -0.05], [0.00, 0.30]]
    ema = [[0.28, -0.08], [0.02, 0.25]]
    delta = [[0.40, -0.20], [-0.30, 0.10]]
    abar = [0.30, 0.90]
    t = lambda v: torch.tensor(v).reshape(2, 1, 1, 2)
    loss, stats = gradspo_loss(t(pol), t(ref), t(ema), t(delta), torch.tensor(abar), beta=10.0, eps=0.1, grad_scale=0.5)
    per = [_expected(pol[i], ref[i], ema[i], delta[i], abar[i], 10.0, 0.1, 0.5) for i in range(2)]
    assert math.isclose(loss.item(), (per[0][0] + per[1][0]) / 2, rel_tol=1e-5)
    assert torch.allclose(stats["ratio_win"], torch.tensor([per[0][1], per[1][1]]), rtol=1e-6)
    assert torch.allclose(stats["ratio_lose"], torch.tensor([per[0][2], per[1][2]]), rtol=1e-6)
    # the two tuples differ in which side the policy is nearer: ratios on both sides of 1
    assert stats["accuracy"].item() == pytest.approx(0.5)


def test_policy_equal_to_reference_gives_log2_and_a_gradient_along_minus_delta():
    ema = torch.zeros(1, 1, 1, 2)
    delta = torch.tensor([1.0, -2.0]).reshape(1, 1, 1, 2)
    pol = torch.zeros(1, 1, 1, 2, requires_grad=True)
    loss, _ = gradspo_loss(pol, torch.zeros(1, 1, 1, 2), ema, delta, torch.tensor([0.75]), 10.0, 0.1, 0.5)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    loss.backward()
    # d loss / d eps = -(1/2) * beta * d(l_w - l_l)/d eps = -(1/2) * 10 * 2 (t_w - t_l) / D,
    # t_w - t_l = -2 s sqrt(1 - abar) delta = -0.5 delta, D = 2  ->  grad = 2.5 * delta: a descent step
    # moves the prediction along -delta, towards the winner's target
    assert torch.allclose(pol.grad, 2.5 * delta)


def test_clipped_ratios_stop_the_gradient():
    ema = torch.zeros(1, 1, 1, 1)
    delta = torch.ones(1, 1, 1, 1)
    # abar 0, s 0.5: targets -0.5 (win) and 0.5 (lose); the policy sits on the winner's target, the reference at 0:
    # log r_w = 0.25 -> clipped to 1.1, log r_l = -0.75 -> clipped to 0.9
    pol = torch.full((1, 1, 1, 1), -0.5, requires_grad=True)
    loss, stats = gradspo_loss(pol, torch.zeros(1, 1, 1, 1), ema, delta, torch.tensor([0.0]), 10.0, 0.1, 0.5)
    assert stats["ratio_win"].item() == pytest.approx(1.1) and stats["ratio_lose"].item() == pytest.approx(0.9)
    assert math.isclose(loss.item(), math.log1p(math.exp(-10 * (math.log(1.1) - math.log(0.9)))), rel_tol=1e-6)
    loss.backward()
    assert pol.grad.abs().sum() == 0


def test_shapes_are_checked():
    x = torch.zeros(2, 1, 1, 2)
    with pytest.raises(ValueError, match="share one shape"):
        gradspo_loss(x, x, x, torch.zeros(2, 1, 1, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="alphas_cumprod_t"):
        gradspo_loss(x, x, x, x, torch.zeros(3))
