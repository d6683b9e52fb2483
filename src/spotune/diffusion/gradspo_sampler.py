"""GradSPO's step-wise sampler: SPO's branching, plus the noise offset of every kept pair.

GradSPO (official code: JoshuaTTJ/GradSPO, built on SPO's) samples exactly as SPO's SD1.5 sampler does
(see :mod:`spotune.diffusion.sampler`), with these changes:

1. each candidate's standard-normal draw z_j (x_{t-1}^j = mean + s_t * z_j) is kept, and every kept
   pair stores ``noise_delta = (z_best - z_worst) / 2``, the winner's offset (the loser's is its
   negative); the loss turns it into targets for the noise prediction;
2. the end of the chain, which GradSPO's two samplers end differently (``ending``):

   - ``sd15`` (``multi_sample_pipeline.py``): the t_{N-2} branch is judged at t_{N-1} as usual, then the
     last step branches once more and its k final candidates are judged at t = t_{N-1} (the schedule's
     last timestep, 1 for SD1.5's 20 steps), not at 0, and every final pair is kept whatever the threshold;
   - ``sdxl`` (``multi_sample_pipeline_sdxl.py`` with ``num_inner_step = 0``, the setting of its SDXL
     recipe): no judging at t_{N-1} and no branch at the last step; each of the k chains of the t_{N-2}
     branch takes its own last step to x0, the k x0s are judged at t = 0, and the t_{N-2} pair is kept
     when the threshold says so. No tuple is kept for the last step (the official code caches that
     transition and deletes it). The t_{N-2} pair's offset is half the difference of *its own* draws,
     the ones that made its two candidates; the official code takes it from the last step's draws
     (lines 427-461 of that file: ``noise_temp`` is overwritten by the single last step at 427 and read
     at 455-459, while every other segment reads its own branch's ``noise_added_cache[0]`` at 312-313),
     an offset with nothing to do with the pair's two candidates, which we take to be a bug.

The candidates are drawn from the same generator in the same order as :func:`spo_sample` draws them,
so with the same seed both samplers visit the same states up to the end; the two endings draw alike
up to the t_{N-2} branch. Both run the one branching loop, :func:`spotune.diffusion.sampler.branching_sample`,
whose ``ending`` holds the two changes above; this module checks the arguments and documents GradSPO's
reading of the official code. The model passed in is the one that samples: for GradSPO, the EMA copy of
the trained model.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from spotune.diffusion.sampler import SamplingResult, branching_sample
from spotune.models.conditioning import Conditioning
from spotune.preference.protocol import PreferenceModel

Ending = Literal["sd15", "sdxl"]
ENDINGS: tuple[str, ...] = ("sd15", "sdxl")


@torch.no_grad()
def gradspo_sample(
    unet: UNet2DConditionModel,
    vae,
    scheduler: DDIMScheduler,
    judge: PreferenceModel,
    prompts: list[str],
    cond: Conditioning,
    negative: Conditioning,
    latents: torch.Tensor,
    *,
    num_inference_steps: int = 20,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    divert_start_step: int = 4,
    num_candidates: int = 4,
    threshold: float = 0.3,
    ending: Ending = "sd15",
    generator: torch.Generator | None = None,
    decode_chunk_size: int = 8,
    judge_batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    tree_row: int | None = None,
) -> SamplingResult:
    """Run GradSPO's step-wise sampling for one batch of prompts (see the module docstring).

    Args:
        unet, vae, scheduler: the sampling model (GradSPO: the EMA model, in eval mode) and its DDIM scheduler.
        judge: ``score(images [B,3,H,W], prompts, timesteps [B]) -> [B]``.
        prompts: b captions; cond their b rows of conditioning; negative the negative prompt's 1 row.
        latents: [b, C, h, w] initial noise x_T (already scaled by ``init_noise_sigma``).
        num_candidates: k (GradSPO: 4 for SD1.5 and SDXL). threshold: ``select_pair``'s (the ``sd15``
            ending keeps its final pairs whatever it says).
        ending: ``sd15`` or ``sdxl``, the official sampler whose end of the chain is reproduced (module
            docstring, point 2). ``sdxl`` needs ``divert_start_step <= num_inference_steps - 2``.
        generator: drives all noise and the choice of the continued candidate.
        decode_chunk_size, judge_batch_size: latents decoded and images scored at once (memory bound; the
            judge scores all k*b at once when unset), as in :func:`spotune.diffusion.sampler.spo_sample`.
        tree_row: record the sampling tree of this prompt in ``result.tree``.
    Returns:
        A :class:`SamplingResult` whose pairs carry ``noise_delta`` [N, C, h, w] float32. ``scores`` [S, k, b]
        and ``valid`` [S, b] per judged step (S = N - divert_start_step, one fewer with the ``sdxl`` ending,
        whose last row is the x0s' scores at t = 0); ``choices`` [S, b] (``sdxl``: [S-1, b], no chain is
        chosen after the final judging); ``final_latents`` [b, C, h, w], the continued chain's x0 (``sdxl``:
        [k*b, C, h, w], the k chains' x0s, row j*b + p).
    """
    if ending not in ENDINGS:
        raise ValueError(f"ending must be one of {', '.join(ENDINGS)}, got {ending!r}")
    # The sdxl ending's last branch is at N-2 at the latest: its candidates need the last step after them.
    last_branch = num_inference_steps - 1 if ending == "sd15" else num_inference_steps - 2
    if not 0 <= divert_start_step <= last_branch:
        raise ValueError(
            f"divert_start_step must be in [0, {last_branch + 1}) for the {ending} ending, got {divert_start_step}"
        )
    return branching_sample(
        unet, vae, scheduler, judge, prompts, cond, negative, latents, ending=f"gradspo-{ending}",
        num_inference_steps=num_inference_steps, eta=eta, guidance_scale=guidance_scale,
        divert_start_step=divert_start_step, num_candidates=num_candidates, threshold=threshold, generator=generator,
        decode_chunk_size=decode_chunk_size, judge_batch_size=judge_batch_size, progress=progress, tree_row=tree_row,
    )
