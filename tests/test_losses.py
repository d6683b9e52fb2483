"""spo_loss on hand-made log-probabilities."""

import math

import torch

from spotune.losses import spo_loss


def test_equal_policy_and_reference_gives_log2():
    z = torch.zeros(4)
    loss, stats = spo_loss(z, z, z, z, beta=10.0, eps=0.1)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert torch.equal(stats["ratio_win"], torch.ones(4))


def test_value_inside_the_clip_range():
    # log ratio_win = 0.05, log ratio_lose = -0.02 -> loss = -log sigmoid(10 * 0.07) = log(1 + e^-0.7)
    loss, _ = spo_loss(torch.tensor([0.05]), torch.tensor([0.0]), torch.tensor([-0.02]), torch.tensor([0.0]), 10.0, 0.1)
    assert math.isclose(loss.item(), math.log1p(math.exp(-0.7)), rel_tol=1e-5)


def test_ratios_are_clipped_and_gradient_stops_outside():
    lw = torch.tensor([1.0, 0.01], requires_grad=True)  # ratio e^1 is clipped to 1.1; e^0.01 is not
    ll = torch.tensor([-1.0, 0.0], requires_grad=True)
    zeros = torch.zeros(2)
    loss, stats = spo_loss(lw, zeros, ll, zeros, beta=10.0, eps=0.1)
    assert torch.allclose(stats["ratio_win"], torch.tensor([1.1, math.exp(0.01)]))
    assert torch.allclose(stats["ratio_lose"], torch.tensor([0.9, 1.0]))
    expected = (-torch.nn.functional.logsigmoid(torch.tensor(10 * (math.log(1.1) - math.log(0.9))))
                - torch.nn.functional.logsigmoid(torch.tensor(10 * 0.01))) / 2
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    loss.backward()
    assert lw.grad[0] == 0 and ll.grad[0] == 0  # clipped: no gradient
    assert lw.grad[1] < 0  # raising logp_win lowers the loss


def test_mean_over_batch():
    a = spo_loss(torch.tensor([0.03]), torch.zeros(1), torch.zeros(1), torch.zeros(1))[0]
    b = spo_loss(torch.tensor([-0.03]), torch.zeros(1), torch.zeros(1), torch.zeros(1))[0]
    both = spo_loss(torch.tensor([0.03, -0.03]), torch.zeros(2), torch.zeros(2), torch.zeros(2))[0]
    assert math.isclose(both.item(), (a.item() + b.item()) / 2, rel_tol=1e-6)
