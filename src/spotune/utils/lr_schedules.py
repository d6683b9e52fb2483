"""Learning-rate schedules: diffusers' named ones, plus DeepSpeed's WarmupDecayLR (SPO's SPM recipe).

SPO's step-aware preference model was trained through DeepSpeed with its ``WarmupDecayLR`` scheduler
(``step_aware_preference_model/trainer/accelerators/deepspeed_accelerator.py``). Its multiplier of the
peak learning rate after ``s`` scheduler steps, with ``W`` warm-up steps and ``T`` steps in all, is::

    log warm-up (DeepSpeed's default):  gamma(s) = log(s + 1) / log(W)          for s < W
    linear warm-up:                     gamma(s) = s / W                         for s < W
    then a linear decay to 0 at T:      gamma(s) = max(0, (T - s) / max(1, T - W))

(``W`` is at least 2, as DeepSpeed makes it; the minimum learning rate is 0, as SPO's config has it.)
The log warm-up is steep: a fifth of the way in (s = 100 of 500), the rate is already 74% of the peak.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

WarmupType = Literal["log", "linear"]
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "warmup_decay")


def warmup_decay_factor(step: int, warmup_steps: int, total_steps: int, warmup_type: WarmupType = "log") -> float:
    """DeepSpeed WarmupDecayLR's multiplier of the peak learning rate after ``step`` scheduler steps.

    Args:
        step: scheduler steps taken so far (0 before the first optimizer step).
        warmup_steps: W, the warm-up length (raised to 2 if smaller, as DeepSpeed does).
        total_steps: T, the step at which the rate reaches 0.
        warmup_type: ``log`` (DeepSpeed's default, and SPO's, whose config does not set it) or ``linear``.
    Returns:
        gamma in [0, 1].
    """
    w = max(2, warmup_steps)
    if step < w:
        if warmup_type == "log":
            return math.log(step + 1) / math.log(w)
        if warmup_type == "linear":
            return step / w
        raise ValueError(f"warmup_type must be log or linear, got {warmup_type!r}")
    return max(0.0, (total_steps - step) / max(1.0, total_steps - w))


def build_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    warmup_type: WarmupType = "log",
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule ``name``, stepped once per optimizer step.

    Args:
        name: one of :data:`SCHEDULES`; ``warmup_decay`` is DeepSpeed's WarmupDecayLR (see the module
            docstring), the others are diffusers' ``get_scheduler`` schedules.
        optimizer: its learning rate is the peak rate.
        warmup_steps, total_steps: in optimizer steps.
        warmup_type: the warm-up shape of ``warmup_decay`` (ignored by the others).
    """
    if name == "warmup_decay":
        if warmup_type not in ("log", "linear"):
            raise ValueError(f"warmup_type must be log or linear, got {warmup_type!r}")
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_decay_factor(s, warmup_steps, total_steps, warmup_type)
        )
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
