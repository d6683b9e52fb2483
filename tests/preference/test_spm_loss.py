"""spm_pair_loss on hand-made features, against the formula written out."""

from __future__ import annotations

import math

import torch

from spotune.preference.spm_loss import spm_pair_loss

E0, E1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
COS45 = torch.tensor([1.0, 1.0])  # unnormalised on purpose: the loss normalises


def _ones(n):
    return torch.ones(n)


def test_decisive_pair_is_cross_entropy_of_the_scaled_cosines():
    s = 2.0  # exp(logit_scale)
    text, img0, img1 = E0[None], E0[None], COS45[None]  # cos = 1 and 1/sqrt(2)
    loss, stats = spm_pair_loss(text, img0, img1, torch.tensor(math.log(s)), torch.tensor([1.0]), torch.tensor([0.0]), _ones(1))
    logits = torch.tensor([s * 1.0, s / math.sqrt(2)])
    expected = -torch.log_softmax(logits, 0)[0]
    torch.testing.assert_close(loss, expected)
    assert stats["accuracy"] == 1.0
    torch.testing.assert_close(stats["prob_preferred"], torch.softmax(logits, 0)[0])
    # The other label reverses the roles.
    loss1, stats1 = spm_pair_loss(text, img0, img1, torch.tensor(math.log(s)), torch.tensor([0.0]), torch.tensor([1.0]), _ones(1))
    torch.testing.assert_close(loss1, -torch.log_softmax(logits, 0)[1])
    assert stats1["accuracy"] == 0.0


def test_a_perfectly_judged_tie_costs_zero_and_a_lopsided_one_does_not():
    half = torch.tensor([0.5])
    loss, stats = spm_pair_loss(E0[None], COS45[None], COS45[None], torch.tensor(4.6), half, half, _ones(1))
    assert abs(loss.item()) < 1e-6
    assert math.isnan(stats["accuracy"])  # ties are not decisive
    lopsided, _ = spm_pair_loss(E0[None], E0[None], E1[None], torch.tensor(0.0), half, half, _ones(1))
    logp = torch.log_softmax(torch.tensor([1.0, 0.0]), 0)
    torch.testing.assert_close(lopsided, -(0.5 * logp[0] + 0.5 * logp[1]) + math.log(0.5))
    assert lopsided > 0


def test_examples_are_weighted_by_one_over_pairs_per_caption():
    text = torch.stack([E0, E0])
    img0, img1 = torch.stack([E0, E1]), torch.stack([E1, E0])
    l0, l1 = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])  # pair 0 is judged right, pair 1 wrong
    per_pair = [spm_pair_loss(text[i:i + 1], img0[i:i + 1], img1[i:i + 1], torch.tensor(1.0), l0[i:i + 1], l1[i:i + 1], _ones(1))[0] for i in range(2)]
    counts = torch.tensor([1.0, 3.0])  # weights 1 and 1/3
    loss, stats = spm_pair_loss(text, img0, img1, torch.tensor(1.0), l0, l1, counts)
    torch.testing.assert_close(loss, (1.0 * per_pair[0] + per_pair[1] / 3) / (1 + 1 / 3))
    assert stats["accuracy"] == 0.5
    # A global normaliser (data parallel) replaces the batch's own sum of weights.
    scaled, _ = spm_pair_loss(text, img0, img1, torch.tensor(1.0), l0, l1, counts, weight_total=torch.tensor(8.0))
    torch.testing.assert_close(scaled, (1.0 * per_pair[0] + per_pair[1] / 3) / 8)


def test_gradient_flows_to_features_and_temperature():
    text = torch.randn(3, 4, requires_grad=True)
    img0, img1 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)
    loss, _ = spm_pair_loss(text, img0, img1, scale, torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.5]), torch.tensor([1.0, 2.0, 1.0]))
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (text, img0, img1, scale))
