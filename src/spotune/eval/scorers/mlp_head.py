"""The five-layer linear head shared by the LAION aesthetic predictor and ImageReward.

Both publish ``layers = Sequential(Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear)``
with no activations between the linears (the ReLUs are commented out in their code), so the weights
sit at ``layers.0``, ``layers.2``, ``layers.4``, ``layers.6`` and ``layers.7``. The widths are read from
the weights, so the same class also holds tiny test heads.
"""

from __future__ import annotations

import torch
from torch import nn

from spotune.eval.scorers.base import WeightFormatError

LINEAR_INDICES = (0, 2, 4, 6, 7)


class LinearStackHead(nn.Module):
    """[B, D] -> [B] through the five linears (dropout is inactive at inference).

    Args:
        widths: (D, h1, h2, h3, h4, 1): the input width, the four hidden widths, and 1.
    """

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        if len(widths) != 6:
            raise ValueError(f"expected 6 widths, got {widths}")
        layers: list[nn.Module] = []
        for i in range(5):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < 3:  # Dropout after the first three linears, as published (indices 1, 3, 5)
                layers.append(nn.Dropout(0.0))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str, prefix: str = "") -> "LinearStackHead":
        """Build the head from ``{prefix}layers.{0,2,4,6,7}.{weight,bias}``, checking every shape."""
        expected = [f"{prefix}layers.{i}.{p}" for i in LINEAR_INDICES for p in ("weight", "bias")]
        missing = [k for k in expected if k not in state]
        if missing:
            present = sorted(k for k in state if k.startswith(prefix))[:8]
            raise WeightFormatError(
                f"{source}: missing key(s) {missing[:4]} of the 5-layer linear head "
                f"(expected {prefix}layers.0/2/4/6/7.weight and .bias; found e.g. {present})"
            )
        weights = [state[f"{prefix}layers.{i}.weight"] for i in LINEAR_INDICES]
        widths = [int(weights[0].shape[1])] + [int(w.shape[0]) for w in weights]
        for i, w in enumerate(weights):
            if w.dim() != 2 or tuple(w.shape) != (widths[i + 1], widths[i]):
                raise WeightFormatError(
                    f"{source}: {prefix}layers.{LINEAR_INDICES[i]}.weight has shape {tuple(w.shape)}, "
                    f"expected {(widths[i + 1], widths[i])}"
                )
        if widths[-1] != 1:
            raise WeightFormatError(f"{source}: the last linear has {widths[-1]} outputs, expected 1")
        head = cls(tuple(widths))
        own = {f"layers.{i}.{p}": state[f"{prefix}layers.{i}.{p}"] for i in LINEAR_INDICES for p in ("weight", "bias")}
        head.load_state_dict({k: v.float() for k, v in own.items()})
        return head.eval().requires_grad_(False)
