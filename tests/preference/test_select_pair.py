"""select_pair on hand-made scores."""

import math

import pytest
import torch

from spotune.preference import select_pair


def test_best_and_worst_and_threshold():
    scores = torch.tensor([[1.0, 0.0, 5.0], [3.0, 0.1, 5.0], [2.0, 0.2, 5.0], [0.0, 0.05, 5.0]])  # [k=4, b=3]
    indices, valid = select_pair(scores, threshold=0.3)
    assert indices.tolist() == [[1, 2, indices[0, 2].item()], [3, 0, indices[1, 2].item()]]
    # prompt 0: softmax(3, 0) gap = tanh(1.5) = 0.905 > 0.3; prompt 1: gap tanh(0.1) = 0.0997; prompt 2: tie
    assert valid.tolist() == [True, False, False]
    assert math.isclose(math.tanh(0.1), 0.0997, abs_tol=1e-3)


def test_threshold_is_strict():
    gap = 2 * math.atanh(0.3)  # scores whose softmax gap is exactly 0.3
    _, valid = select_pair(torch.tensor([[gap], [0.0]]), threshold=0.3 + 1e-6)
    assert not valid.item()
    _, valid = select_pair(torch.tensor([[gap], [0.0]]), threshold=0.3 - 1e-6)
    assert valid.item()


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[k, b\]"):
        select_pair(torch.zeros(4), 0.3)
    with pytest.raises(ValueError, match="at least 2"):
        select_pair(torch.zeros(1, 3), 0.3)
