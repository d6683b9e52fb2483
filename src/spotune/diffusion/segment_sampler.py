"""SPO's SDXL sampler: branch every ``num_inner_steps + 1`` steps and judge whole segments.

The authors' SDXL recipe does not use their SD1.5 sampler (:func:`spotune.diffusion.sampler.spo_sample`)
with other numbers; it has a sampler of its own (``multi_sample_pipeline_sdxl``). Per batch of b prompts
and a DDIM schedule t_0 > t_1 > ... > t_{N-1}, with k candidates and n = ``num_inner_steps``:

1. steps 0 .. divert_start_step-1 denoise one chain per prompt;
2. *evaluation steps* are the steps i with (i >= divert_start_step and no inner step left) or i = N-1;
   after each, n inner steps follow. With 20 steps, divert 4 and n = 3: i = 4, 8, 12, 16, 19;
3. at the first evaluation step (i = divert_start_step) k candidates x_{t_{i+1}} are drawn from the one
   chain's x_{t_i} (one posterior mean, k noises). That *branching transition* opens a segment;
4. at every other step each of the k chains takes its own single DDIM step, and each of those
   transitions joins the open segment;
5. at a later evaluation step i < N-1 each chain's x0-prediction at (x_{t_i}, t_i) is decoded and scored
   at t_i; the best and the worst chain are compared with the threshold and, for a decisive prompt,
   *every* transition of the segment becomes a tuple: (x_tau of the winning chain, of the losing chain,
   their x_{tau+1}, t_tau, the prompt). Only the branching transition shares x_t between win and lose.
   Then one chain is drawn uniformly at random and k new candidates branch from it (a new segment);
6. the last step (i = N-1) does not branch: each chain steps to x0, the k x0s are scored at t = 0, and
   the last segment is closed like the others.

So with 20 steps, divert 4 and n = 3 a decisive prompt yields 4 segments x 4 transitions = 16 tuples,
12 of them with two different states x_t. With n = 0 the segments are single branching transitions, as
in the SD1.5 sampler, except the last: at step N-2 the candidates branch, at N-1 each chain steps to x0
on its own, and the final scores at t = 0 label both transitions (the SD1.5 sampler instead judges the
t_{N-2} candidates at t_{N-1} and branches once more at the last step). The guided UNet runs once per
step (on b latents up to the first branch, on k*b after it); judging reuses that pass.

The candidates are drawn with ``generator`` in the layout the SD1.5 sampler uses (candidate-major rows
j*b + p), and the continued chain is drawn from it too, so a run is reproducible from its seed.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from spotune.diffusion.ddim import ddim_step_with_logprob, predict_x0_and_eps
from spotune.diffusion.tree import SamplingTree
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


def evaluation_steps(num_inference_steps: int, divert_start_step: int, num_inner_steps: int) -> list[int]:
    """The steps i at which the SDXL sampler branches or judges (see the module docstring, point 2)."""
    steps, left = [], 0
    for i in range(num_inference_steps):
        if (i >= divert_start_step and left == 0) or i == num_inference_steps - 1:
            steps.append(i)
            left = num_inner_steps
        elif i >= divert_start_step:
            left -= 1
    return steps


def judged_steps(num_inference_steps: int, divert_start_step: int, num_inner_steps: int) -> list[int]:
    """The evaluation steps after the first branch, where candidates are scored and segments closed.

    Empty when ``divert_start_step`` is the last step: the first branch would then have no step after it.
    """
    return [i for i in evaluation_steps(num_inference_steps, divert_start_step, num_inner_steps) if i > divert_start_step]


@torch.no_grad()
def segment_spo_sample(
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
    num_candidates: int = 2,
    num_inner_steps: int = 3,
    threshold: float = 0.4,
    generator: torch.Generator | None = None,
    decode_chunk_size: int = 8,
    judge_batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    tree_row: int | None = None,
) -> SamplingResult:
    """Run the SDXL sampler for one batch of prompts (see the module docstring).

    Args:
        unet, vae, scheduler: the model being trained (in eval mode) and its DDIM scheduler.
        judge: ``score(images [B,3,H,W], prompts, timesteps [B]) -> [B]``.
        prompts: b captions; ``cond`` their b rows of conditioning; ``negative`` 1 row.
        latents: [b, C, h, w] initial noise x_T (already scaled by ``init_noise_sigma``).
        num_candidates: k (SPO SDXL: 2). num_inner_steps: n (SPO SDXL: 3). threshold: SPO SDXL 0.4.
        tree_row: record this prompt's tree: a row per step after the first branch, the k chains'
            x0-predictions (decoded for the tree alone at the inner steps, which are not judged).
        others: as in :func:`spotune.diffusion.sampler.spo_sample`.
    Returns:
        A :class:`SamplingResult` whose ``pairs`` set ``latents_lose`` (x_t of the losing chain) and
        ``shared`` (True for branching transitions, where it equals ``latents``); ``scores`` [S, k, b] and
        ``valid`` [S, b] for the S judged steps; ``choices`` [S-1, b], the chain each new branch grew from;
        ``final_latents`` [k*b, C, h, w], the k chains' x0 (row j*b + p).
    """
    if not 0 <= divert_start_step < num_inference_steps - 1:
        raise ValueError(
            f"divert_start_step must be in [0, {num_inference_steps - 1}) for the SDXL sampler (its first branch "
            f"needs a later step to be judged at), got {divert_start_step}"
        )
    if num_inner_steps < 0:
        raise ValueError(f"num_inner_steps must be >= 0, got {num_inner_steps}")
    b, k = check_branching_batch(latents, prompts, cond, num_candidates)
    device = latents.device
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    last = len(timesteps) - 1
    rows = torch.arange(b, device=device)
    cand_cond = cond.repeat(k)  # k*b rows, candidate-major: row j*b + p
    cand_prompts = list(prompts) * k

    def kb(x: torch.Tensor) -> torch.Tensor:  # [k*b, ...] -> [k, b, ...]
        return x.view(k, b, *x.shape[1:])

    # The open segment: one entry per transition, (x_tau [k,b,C,h,w], x_{tau+1} [k,b,C,h,w], step tau, shared).
    segment: list[tuple[torch.Tensor, torch.Tensor, int, bool]] = []
    # Closed segments, per transition, for all b prompts; the decisive ones are picked once after the loop.
    kept: dict[str, list[torch.Tensor]] = {k_: [] for k_ in ("latents", "latents_lose", "win", "lose", "t", "step", "shared", "valid")}
    all_scores, all_valid, all_choices, judged = [], [], [], []
    judge_calls = unet_calls = 0
    tree = None if tree_row is None else SamplingTree(tree_row, "sdxl")

    def close_segment(step: int, t: torch.Tensor, judge_t: torch.Tensor, images: torch.Tensor, scores: torch.Tensor) -> None:
        """Label every transition of the open segment with the chains' [k, b] scores (of [k*b] ``images``)."""
        indices, valid = select_pair(scores, threshold)  # [2, b], [b]
        judged.append(step)
        if tree is not None:
            tree.judged(step, t, judge_t, images, scores, threshold, valid)
        win, lose = indices[0], indices[1]
        for x_from, x_to, step, shared in segment:
            kept["latents"].append(x_from[win, rows])
            kept["latents_lose"].append(x_from[lose, rows])
            kept["win"].append(x_to[win, rows])
            kept["lose"].append(x_to[lose, rows])
            kept["t"].append(timesteps[step].expand(b).long())
            kept["step"].append(torch.full((b,), step, dtype=torch.long, device=device))
            kept["shared"].append(torch.full((b,), shared, dtype=torch.bool, device=device))
            kept["valid"].append(valid)
        all_scores.append(scores)
        all_valid.append(valid)
        segment.clear()

    def judge_images(x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[k*b, 3, H, W] decoded images of [k*b] x0 latents and their [k, b] scores at ``t``."""
        images = decode_latents(vae, x0, decode_chunk_size)
        return images, _score_in_batches(judge, images, cand_prompts, t, judge_batch_size).float().view(k, b)

    x = latents  # [b, C, h, w] up to the first branch, [k*b, C, h, w] after it
    inner_left = 0
    for i, t in enumerate(timesteps):
        branched = i > divert_start_step
        n_rows = k * b if branched else b
        t_rows = t.expand(n_rows)
        out = guided_noise_pred(unet, x, t_rows, cand_cond if branched else cond, negative, guidance_scale)
        unet_calls += 1
        evaluate = (i >= divert_start_step and inner_left == 0) or i == last
        if not evaluate:  # a single step of every chain; after the branch, an inner transition
            x_next, _ = ddim_step_with_logprob(scheduler, out, t_rows, x, eta, generator=generator)
            if branched:
                inner_left -= 1
                segment.append((kb(x), kb(x_next), i, False))
                if tree is not None:  # the recorded prompt's k chains only: no judge sees these x0s
                    x0, _ = predict_x0_and_eps(scheduler, out, t_rows, x)
                    tree.unjudged(i, t, decode_latents(vae, kb(x0)[:, tree_row], decode_chunk_size))
            x = x_next
            if progress:
                progress(1)
            continue
        inner_left = num_inner_steps
        if i == last:  # no branch: each chain steps to x0, the x0s are judged at t = 0
            x_next, _ = ddim_step_with_logprob(scheduler, out, t_rows, x, eta, generator=generator)
            segment.append((kb(x), kb(x_next), i, False))
            zero = torch.zeros(k * b, dtype=torch.long, device=device)
            close_segment(i, t, zero, *judge_images(x_next.float(), zero))
            judge_calls += 1
            x = x_next
            if progress:
                progress(1)
            break
        if i == divert_start_step:  # the first branch grows from the one chain
            x_from, out_from = x, out
        else:  # judge each chain's x0-prediction at t_i, close the segment, continue from a random chain
            x0, _ = predict_x0_and_eps(scheduler, out, t_rows, x)
            close_segment(i, t, t_rows, *judge_images(x0, t_rows))
            judge_calls += 1
            choice = torch.randint(0, k, (b,), generator=generator, device=generator.device if generator else "cpu").to(device)
            all_choices.append(choice)
            if tree is not None:
                tree.continued_from(choice)
            x_from, out_from = kb(x)[choice, rows], kb(out)[choice, rows]
        # Branch: k candidates x_{t_{i+1}} from the shared x_{t_i}, same mean, independent noise.
        x_rep = x_from.repeat(k, 1, 1, 1)  # [k*b, C, h, w]
        cands, _ = ddim_step_with_logprob(scheduler, out_from.repeat(k, 1, 1, 1), t.expand(k * b), x_rep, eta, generator=generator)
        segment.append((kb(x_rep), kb(cands), i, True))
        x = cands
        if progress:
            progress(1)

    valid_nb = torch.stack(kept["valid"])  # [transitions, b]
    trans_of, prompt_of = valid_nb.nonzero(as_tuple=True)  # decisive tuples, step-major then prompt order
    flat = trans_of * b + prompt_of
    pairs = StepPairs(
        latents=torch.cat(kept["latents"])[flat],
        win=torch.cat(kept["win"])[flat],
        lose=torch.cat(kept["lose"])[flat],
        timesteps=torch.cat(kept["t"])[flat],
        cond=cond.select(prompt_of),
        prompt_index=prompt_of,
        step_index=torch.cat(kept["step"])[flat],
        latents_lose=torch.cat(kept["latents_lose"])[flat],
        shared=torch.cat(kept["shared"])[flat],
    )
    return SamplingResult(
        pairs=pairs,
        final_latents=x,
        scores=torch.stack(all_scores),
        valid=torch.stack(all_valid),
        choices=torch.stack(all_choices) if all_choices else torch.zeros(0, b, dtype=torch.long, device=device),
        judge_calls=judge_calls,
        unet_calls=unet_calls,
        judged_steps=judged,
        tree=tree,
    )
