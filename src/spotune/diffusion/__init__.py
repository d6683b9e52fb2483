"""Step-wise sampling for SPO: the DDIM step with its log-density, and the SPO sampler.

Public names: :func:`ddim_step_with_logprob` (one DDIM step x_t -> x_{t-1} and log p of it) and
:func:`spo_sample` (the step-wise sampler that yields win/lose tuples; :func:`segment_spo_sample` is
the authors' SDXL variant that branches every ``num_inner_steps + 1`` steps), with the samplers and
helpers beside them. They pull in diffusers, so they are imported on first access (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ddim_step_with_logprob": "spotune.diffusion.ddim",
    "predict_x0_and_eps": "spotune.diffusion.ddim",
    "previous_timestep": "spotune.diffusion.ddim",
    "spo_sample": "spotune.diffusion.sampler",
    "trajectory_sample": "spotune.diffusion.sampler",
    "segment_spo_sample": "spotune.diffusion.segment_sampler",
    "ddim_sample": "spotune.diffusion.sampler",
    "sampling_unet_evaluations": "spotune.diffusion.sampler",
    "decode_latents": "spotune.diffusion.sampler",
    "guided_noise_pred": "spotune.diffusion.sampler",
    "StepPairs": "spotune.diffusion.sampler",
    "SamplingResult": "spotune.diffusion.sampler",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spotune.diffusion' has no attribute {name!r}")
