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
up to the t_{N-2} branch. The model passed in is the one that samples: for GradSPO, the EMA copy of the
trained model.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from spotune.diffusion.ddim import ddim_posterior, ddim_step_with_logprob, predict_x0_and_eps, previous_timestep
from spotune.diffusion.sampler import (
    SamplingResult,
    StepPairs,
    _score_in_batches,
    check_branching_batch,
    decode_latents,
    guided_noise_pred,
)
from spotune.models.conditioning import Conditioning
from spotune.preference.protocol import PreferenceModel
from spotune.preference.select import select_pair


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
    b, k = check_branching_batch(latents, prompts, cond, num_candidates)
    device = latents.device
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    x = latents
    noise_pred: torch.Tensor | None = None  # guided output at (x, t_i), when already known
    kept: list[StepPairs] = []
    all_scores, all_valid, all_choices = [], [], []
    judge_calls = unet_calls = 0
    cand_cond = cond.repeat(k)  # k*b rows, candidate-major: row j*b + p
    cand_prompts = list(prompts) * k

    for i, t in enumerate(timesteps):
        t_batch = t.expand(b)
        if noise_pred is None:
            noise_pred = guided_noise_pred(unet, x, t_batch, cond, negative, guidance_scale)
            unet_calls += 1
        if i < divert_start_step:
            x, _ = ddim_step_with_logprob(scheduler, noise_pred, t_batch, x, eta, generator=generator)
            noise_pred = None
            if progress:
                progress(1)
            continue

        # Branch: k candidates from the shared x_{t_i}, drawn as ddim_step_with_logprob draws them,
        # but with the standard-normal z kept: the loss needs it.
        mean, std = ddim_posterior(scheduler, noise_pred.repeat(k, 1, 1, 1), t.expand(k * b), x.repeat(k, 1, 1, 1), eta)
        z = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)  # [k*b, C, h, w]
        cands = (mean + std * z).to(x.dtype)
        last = i == len(timesteps) - 1  # the sd15 ending only: the sdxl one stops after its last branch
        final = ending == "sdxl" and i == last_branch
        if last:
            # GradSPO's SD1.5 sampler judges the final images at the last step's own timestep and keeps every pair.
            x0 = cands.float()
            judge_t = t.expand(k * b).long()
            cand_noise = None
        else:
            judge_t = previous_timestep(scheduler, t.expand(k * b))
            cand_noise = guided_noise_pred(unet, cands, judge_t, cand_cond, negative, guidance_scale)
            unet_calls += 1
            if final:
                # GradSPO's SDXL sampler: no judging at t_{N-1}; each chain takes its own last step (one draw
                # each, in the same [k*b] layout) and the x0s are judged at t = 0.
                ends, _ = ddim_step_with_logprob(scheduler, cand_noise, judge_t, cands, eta, generator=generator)
                x0 = ends.float()
                judge_t = torch.zeros(k * b, dtype=torch.long, device=device)
            else:
                x0, _ = predict_x0_and_eps(scheduler, cand_noise, judge_t, cands)
        images = decode_latents(vae, x0, decode_chunk_size)
        scores = _score_in_batches(judge, images, cand_prompts, judge_t, judge_batch_size).float().view(k, b)  # [k, b]
        judge_calls += 1
        indices, valid = select_pair(scores, threshold)  # [2, b], [b]
        if last:
            valid = torch.ones_like(valid)

        cands_kb = cands.view(k, b, *cands.shape[1:])  # [k, b, C, h, w]
        z_kb = z.view(k, b, *z.shape[1:])
        rows = torch.arange(b, device=device)
        keep = valid.nonzero().squeeze(1)
        if keep.numel():
            best, worst = indices[0, keep], indices[1, keep]
            kept.append(
                StepPairs(
                    latents=x[keep],
                    win=cands_kb[best, keep],
                    lose=cands_kb[worst, keep],
                    timesteps=t_batch[keep].long(),
                    cond=cond.select(keep),
                    prompt_index=keep,
                    step_index=torch.full_like(keep, i),
                    # The pair's own draws, also for the sdxl ending's final pair (module docstring).
                    noise_delta=(z_kb[best, keep] - z_kb[worst, keep]) / 2,
                )
            )
        all_scores.append(scores)
        all_valid.append(valid)
        if final:
            x = ends  # [k*b, C, h, w]: every chain's x0; no chain is continued
            if progress:
                progress(2)  # this branch and the last step
            break
        # Continue from a uniformly random candidate, and reuse its already computed UNet output.
        choice = torch.randint(0, k, (b,), generator=generator, device=generator.device if generator else "cpu").to(device)
        x = cands_kb[choice, rows]
        noise_pred = None if cand_noise is None else cand_noise.view(k, b, *cand_noise.shape[1:])[choice, rows]
        all_choices.append(choice)
        if progress:
            progress(1)

    if kept:
        pairs = StepPairs.cat(kept)
    else:
        empty = StepPairs.empty_like(latents, cond)
        pairs = StepPairs.from_tensors({**empty.tensors(), "noise_delta": latents[:0].float()})
    return SamplingResult(
        pairs=pairs,
        final_latents=x,
        scores=torch.stack(all_scores),
        valid=torch.stack(all_valid),
        choices=torch.stack(all_choices) if all_choices else torch.zeros(0, b, dtype=torch.long, device=device),
        judge_calls=judge_calls,
        unet_calls=unet_calls,
    )
