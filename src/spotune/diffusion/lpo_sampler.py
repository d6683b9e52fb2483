"""LPO's step-wise sampler: SPO's branching, judged on noisy latents by the latent reward model.

LPO (Zhang et al., arXiv 2502.01051; code Kwai-Kolors/LPO, ``lpo/lpo/custom_diffusers/multi_sample_pipeline.py``
and its SDXL twin) samples as SPO's SD1.5 sampler does (:mod:`spotune.diffusion.sampler`), except:

1. the k candidates x_{t-1} of a step are scored *as they are*, noisy latents, by the LRM
   (:mod:`spotune.preference.lrm`): no guided UNet pass on the k candidates, no x0-prediction, no VAE
   decode, no pixel judge. The UNet runs once per step, on the b continued chains;
2. the LRM scores a candidate at the timestep t of the step that drew it (the authors' code passes the
   loop's t), not at its own noise level t-1; ``judge_timestep="own"`` offers the latter;
3. a pair is kept when its softmax gap exceeds a threshold that follows the step's DDIM standard deviation
   (:func:`spotune.preference.select.sigma_threshold`; SD1.5 0.35 -> 0.5, SDXL 0.45 -> 0.6), where SPO's is
   one number;
4. the last step is judged like any other (its candidates at t = 1), and the chain goes on from a uniformly
   random candidate, as in SPO. ``divert_start_step`` is 0 in LPO's configs. SDXL's LPO uses this same
   loop (its code has no segments).

The candidates and the continued chain are drawn from ``generator`` in the order SPO's sampler draws them.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from spotune.diffusion.sampler import LatentJudgeTimestep, SamplingResult, branching_sample
from spotune.models.conditioning import Conditioning
from spotune.preference.select import sigma_threshold


@torch.no_grad()
def lpo_sample(
    unet: UNet2DConditionModel,
    vae,
    scheduler: DDIMScheduler,
    judge,
    prompts: list[str],
    cond: Conditioning,
    negative: Conditioning,
    latents: torch.Tensor,
    *,
    num_inference_steps: int = 20,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    divert_start_step: int = 0,
    num_candidates: int = 4,
    threshold_range: tuple[float, float] = (0.35, 0.5),
    judge_timestep: LatentJudgeTimestep = "authors",
    generator: torch.Generator | None = None,
    decode_chunk_size: int = 8,
    judge_batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    tree_row: int | None = None,
) -> SamplingResult:
    """Run LPO's step-wise sampling for one batch of prompts (see the module docstring).

    Args:
        unet, vae, scheduler: the model being trained (in eval mode), its VAE (used only to draw a sampling
            tree) and its DDIM scheduler.
        judge: a latent judge, ``score(latents [B, C, h, w], prompts, timesteps [B]) -> [B]`` (an LRM).
        prompts: b captions; ``cond`` their b rows of conditioning; ``negative`` 1 row.
        latents: [b, C, h, w] initial noise x_T (already scaled by ``init_noise_sigma``).
        threshold_range: (low, high), the threshold at the least and the most noisy step.
        judge_timestep: ``authors`` (t of the drawing step) or ``own`` (t-1).
        judge_batch_size: latents scored at once (all k*b when unset).
        others: as in :func:`spotune.diffusion.sampler.spo_sample`.
    Returns:
        A :class:`SamplingResult`; ``scores`` [S, k, b], ``valid`` and ``choices`` [S, b] with S = N -
        ``divert_start_step``, ``thresholds`` the S thresholds, ``final_latents`` [b, C, h, w].
    """
    if not 0 <= divert_start_step < num_inference_steps:
        raise ValueError(f"divert_start_step must be in [0, {num_inference_steps}), got {divert_start_step}")
    low, high = threshold_range
    if not 0 <= low <= high < 1:
        raise ValueError(f"the threshold range must satisfy 0 <= low <= high < 1, got {threshold_range}")
    if not getattr(judge, "judges_latents", False):
        raise ValueError("LPO's sampler needs a latent judge (an LRM), whose score takes latents")
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    step_thresholds = sigma_threshold(scheduler, scheduler.timesteps, low, high, eta)  # [N]
    return branching_sample(
        unet, vae, scheduler, judge, prompts, cond, negative, latents, ending="lpo",
        num_inference_steps=num_inference_steps, eta=eta, guidance_scale=guidance_scale,
        divert_start_step=divert_start_step, num_candidates=num_candidates, threshold=high, generator=generator,
        decode_chunk_size=decode_chunk_size, judge_batch_size=judge_batch_size, progress=progress, tree_row=tree_row,
        step_thresholds=step_thresholds, latent_judge_timestep=judge_timestep,
    )
