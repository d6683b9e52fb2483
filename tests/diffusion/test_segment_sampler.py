"""The SDXL sampler (segments of num_inner_steps + 1 steps) on the tiny SDXL-architecture pipeline.

The strongest check is ``test_matches_a_restatement_of_the_authors_loop``: a plain loop written here from
the authors' ``multi_sample_pipeline_sdxl`` (its counter, its per-segment caches stacked and gathered by
the best/worst indices), run with the same seeds, must give the same tuples bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from spotune.diffusion.ddim import ddim_step_with_logprob, predict_x0_and_eps
from spotune.diffusion.sampler import decode_latents, guided_noise_pred
from spotune.diffusion.segment_sampler import evaluation_steps, judged_steps, segment_spo_sample
from spotune.preference.select import select_pair

from sdxl_sampling_helpers import CountingUNet, sdxl_inputs


class RecordingJudge:
    """Scores by mean brightness and records every call (batch size, prompts, timesteps)."""

    def __init__(self):
        self.calls = []

    def score(self, images, prompts, timesteps):
        self.calls.append((images.shape[0], list(prompts), timesteps.clone()))
        return images.float().mean(dim=(1, 2, 3)) * 100


def _run(pipe, judge, *, b=2, k=2, steps=20, divert=4, inner=3, threshold=0.0, seed=0, unet=None):
    prompts, cond, neg, latents, g = sdxl_inputs(pipe, b, seed)
    return segment_spo_sample(
        unet or pipe.unet, pipe.vae, pipe.scheduler, judge, prompts, cond, neg, latents,
        num_inference_steps=steps, divert_start_step=divert, num_candidates=k, num_inner_steps=inner,
        threshold=threshold, guidance_scale=5.0, eta=1.0, generator=g,
    )


def test_evaluation_steps_follow_the_authors_counter():
    assert evaluation_steps(20, 4, 3) == [4, 8, 12, 16, 19]
    assert judged_steps(20, 4, 3) == [8, 12, 16, 19]
    # 19 is an evaluation step because it is the last, whatever the counter says: the last segment is 16..19
    assert evaluation_steps(20, 3, 3) == [3, 7, 11, 15, 19] and evaluation_steps(20, 5, 3) == [5, 9, 13, 17, 19]
    assert evaluation_steps(20, 4, 0) == list(range(4, 20))
    assert evaluation_steps(20, 4, 100) == [4, 19]  # one segment, judged at the end
    assert judged_steps(20, 19, 3) == []  # the first branch at the last step: nothing after it to judge


def test_sdxl_recipe_segments(sdxl):
    """20 steps, divert 4, 3 inner steps, k = 2: judged at t_8, t_12, t_16 and (the x0s) at 0; 16 tuples
    per decisive prompt, sharing x_t only at the branching steps 4, 8, 12, 16."""
    judge, counting = RecordingJudge(), CountingUNet(sdxl.unet)
    b, k = 2, 2
    result = _run(sdxl, judge, b=b, k=k, unet=counting)
    timesteps = sdxl.scheduler.timesteps.tolist()
    assert result.judge_calls == len(judge.calls) == 4
    assert [c[2].tolist() for c in judge.calls] == [[timesteps[i]] * (k * b) for i in (8, 12, 16)] + [[0] * (k * b)]
    assert all(n == k * b and p == [f"prompt {i}" for i in range(b)] * k for n, p, _ in judge.calls)
    # one guided pass per step, on b latents up to the branch and on k*b after it, doubled for CFG
    assert counting.batches == [2 * b] * 5 + [2 * k * b] * 15 and result.unet_calls == 20
    assert result.scores.shape == (4, k, b) and result.valid.shape == (4, b) and result.choices.shape == (3, b)
    pairs = result.pairs
    for p in range(b):
        mine = pairs.prompt_index == p
        expected = 16 * int(result.valid[:, p].all())  # all four segments decisive at threshold 0 here
        assert int(mine.sum()) == expected == 16
        assert pairs.step_index[mine].tolist() == list(range(4, 20))
        assert pairs.timesteps[mine].tolist() == timesteps[4:]
    shared_steps = pairs.step_index[pairs.shared].unique().tolist()
    assert shared_steps == [4, 8, 12, 16]
    assert torch.equal(pairs.latents[pairs.shared], pairs.latents_lose[pairs.shared])
    two = ~pairs.shared
    assert all(not torch.equal(a, c) for a, c in zip(pairs.latents[two], pairs.latents_lose[two]))
    assert not torch.equal(pairs.win, pairs.lose)


def test_tuples_chain_into_each_other_and_the_branch_grows_from_the_chosen_chain(sdxl):
    """Within a segment each transition starts where the previous one of the same chain ended; a new
    segment's branch starts from the chain ``choices`` names, which is one of the k."""
    result = _run(sdxl, RecordingJudge(), b=2, k=2)
    pairs = result.pairs
    for p in range(2):
        rows = (pairs.prompt_index == p).nonzero().squeeze(1)
        by_step = {int(pairs.step_index[r]): r for r in rows}
        for step in range(5, 20):
            prev, cur = by_step[step - 1], by_step[step]
            if step in (8, 12, 16):  # a new branch: from the chosen chain of the closed segment
                segment = {8: 0, 12: 1, 16: 2}[step]
                indices, _ = select_pair(result.scores[segment], 0.0)
                chosen = int(result.choices[segment, p])
                assert 0 <= chosen < 2
                ended = pairs.win[prev] if chosen == int(indices[0, p]) else pairs.lose[prev]
                assert torch.equal(pairs.latents[cur], ended)
            else:  # an inner step: the same winning and losing chains go on
                assert torch.equal(pairs.latents[cur], pairs.win[prev])
                assert torch.equal(pairs.latents_lose[cur], pairs.lose[prev])


def test_no_inner_steps_still_ends_with_the_sdxl_last_segment(sdxl):
    """num_inner_steps = 0: single-transition segments judged at the next step, except the last, which
    holds the t_{N-2} branch and every chain's own t_{N-1} step, both labelled by the x0s at t = 0."""
    judge = RecordingJudge()
    steps, divert, b, k = 8, 2, 2, 3
    result = _run(sdxl, judge, b=b, k=k, steps=steps, divert=divert, inner=0)
    timesteps = sdxl.scheduler.timesteps.tolist()
    # judged at t_3 .. t_6 (each branch at the next step), then the x0s at 0: no judging at t_7
    assert [c[2][0].item() for c in judge.calls] == timesteps[divert + 1 : steps - 1] + [0]
    assert result.judge_calls == steps - divert - 1
    pairs = result.pairs
    rows = pairs.prompt_index == 0
    assert pairs.step_index[rows].tolist() == list(range(divert, steps))
    assert pairs.shared[rows].tolist() == [True] * (steps - divert - 1) + [False]


def test_threshold_and_seed(sdxl):
    loose = _run(sdxl, RecordingJudge(), steps=10, divert=2, inner=2, threshold=0.0, seed=1)
    strict = _run(sdxl, RecordingJudge(), steps=10, divert=2, inner=2, threshold=0.999, seed=1)
    assert len(strict.pairs) < len(loose.pairs)
    again = _run(sdxl, RecordingJudge(), steps=10, divert=2, inner=2, threshold=0.0, seed=1)
    assert torch.equal(again.pairs.win, loose.pairs.win) and torch.equal(again.final_latents, loose.final_latents)


def test_bad_arguments(sdxl):
    with pytest.raises(ValueError, match="divert_start_step"):
        _run(sdxl, RecordingJudge(), steps=6, divert=5)
    with pytest.raises(ValueError, match="num_inner_steps"):
        _run(sdxl, RecordingJudge(), steps=6, divert=2, inner=-1)


def _authors_loop(pipe, judge, prompts, cond, neg, latents, g, *, steps, divert, inner, k, threshold):
    """The authors' SDXL sampler restated: a step counter, caches of (x_t, x_{t-1}, t) per segment,
    stacked on a segment axis and gathered by the best/worst indices. Returns the tuples in their order."""
    s, unet, vae = pipe.scheduler, pipe.unet, pipe.vae
    s.set_timesteps(steps)
    ts = s.timesteps
    b = len(prompts)
    x = latents
    inner_step_left = 0
    current_cache, next_cache, t_cache = [], [], []
    out = {"latents": [], "latents_lose": [], "win": [], "lose": [], "t": []}

    def step(eps, x_t, t):
        return ddim_step_with_logprob(s, eps, t.expand(x_t.shape[0]), x_t, 1.0, generator=g)[0]

    def collect(scores):
        indices, valid = select_pair(scores.view(k, b), threshold)
        cur = torch.stack(current_cache, dim=2)  # k, b, S, C, h, w
        nxt = torch.stack(next_cache, dim=2)
        idx = indices[:, :, None, None, None, None].expand(-1, -1, *cur.shape[2:])
        cur2, nxt2 = torch.gather(cur, 0, idx)[:, valid], torch.gather(nxt, 0, idx)[:, valid]  # 2, V, S, ...
        for j in range(cur2.shape[2]):
            out["latents"].append(cur2[0, :, j])
            out["latents_lose"].append(cur2[1, :, j])
            out["win"].append(nxt2[0, :, j])
            out["lose"].append(nxt2[1, :, j])
            out["t"].append(t_cache[j].repeat(int(valid.sum())))

    for i, t in enumerate(ts):
        c = cond if x.shape[0] == b else cond.repeat(k)
        eps = guided_noise_pred(unet, x, t.expand(x.shape[0]), c, neg, 5.0)
        if (i >= divert and inner_step_left == 0) or i == len(ts) - 1:
            inner_step_left = inner
            if i == divert:
                prev = step(eps.repeat(k, 1, 1, 1), x.repeat(k, 1, 1, 1), t)
                current_cache.append(x.unsqueeze(0).repeat(k, 1, 1, 1, 1))
                next_cache.append(prev.view(k, b, *x.shape[1:]))
                t_cache.append(t)
                x = prev
            elif i != len(ts) - 1:
                x0, _ = predict_x0_and_eps(s, eps, t.expand(x.shape[0]), x)
                collect(judge.score(decode_latents(vae, x0), list(prompts) * k, t.expand(k * b)).float())
                choice = torch.randint(0, k, (b,), generator=g)
                x_c = x.view(k, b, *x.shape[1:])[choice, torch.arange(b)]
                eps_c = eps.view(k, b, *x.shape[1:])[choice, torch.arange(b)]
                current_cache, next_cache, t_cache = [x_c.unsqueeze(0).repeat(k, 1, 1, 1, 1)], [], [t]
                prev = step(eps_c.repeat(k, 1, 1, 1), x_c.repeat(k, 1, 1, 1), t)
                next_cache.append(prev.view(k, b, *x.shape[1:]))
                x = prev
            else:
                prev = step(eps, x, t)
                current_cache.append(x.view(k, b, *x.shape[1:]))
                next_cache.append(prev.view(k, b, *x.shape[1:]))
                t_cache.append(t)
                collect(judge.score(decode_latents(vae, prev.float()), list(prompts) * k, torch.zeros(k * b, dtype=torch.long)).float())
        else:
            prev = step(eps, x, t)
            if i >= divert:
                inner_step_left -= 1
                current_cache.append(x.view(k, b, *x.shape[1:]))
                next_cache.append(prev.view(k, b, *x.shape[1:]))
                t_cache.append(t)
            x = prev
    return {key: torch.cat(v) for key, v in out.items()}


@pytest.mark.parametrize("steps,divert,inner,k,threshold", [(20, 4, 3, 2, 0.0), (9, 1, 2, 3, 0.3), (7, 2, 0, 2, 0.0)])
def test_matches_a_restatement_of_the_authors_loop(sdxl, steps, divert, inner, k, threshold):
    b = 3
    result = _run(sdxl, RecordingJudge(), b=b, k=k, steps=steps, divert=divert, inner=inner, threshold=threshold, seed=5)
    prompts, cond, neg, latents, g = sdxl_inputs(sdxl, b, 5)
    ref = _authors_loop(sdxl, RecordingJudge(), prompts, cond, neg, latents, g,
                        steps=steps, divert=divert, inner=inner, k=k, threshold=threshold)
    pairs = result.pairs
    assert len(pairs) == len(ref["t"]) > 0
    for name in ("latents", "latents_lose", "win", "lose"):
        assert torch.equal(getattr(pairs, name), ref[name]), name
    assert torch.equal(pairs.timesteps, ref["t"].long())
