"""GradSPO's SDXL sampler (``gradspo_sample(ending="sdxl")``) on the tiny SDXL-architecture pipeline.

The strongest check is ``test_matches_a_restatement_of_the_official_sdxl_loop``: a plain loop written here
from GradSPO's ``multi_sample_pipeline_sdxl`` with ``num_inner_step = 0`` (its counter, its per-segment
caches, the deleted last transition, the noise offsets it reads), run with the same seeds, must give the
same tuples bit for bit, except the final pair's offset, which spotune takes from that pair's own draws.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from spotune.diffusion.ddim import ddim_posterior, predict_x0_and_eps
from spotune.diffusion.gradspo_sampler import gradspo_sample
from spotune.diffusion.sampler import decode_latents, guided_noise_pred
from spotune.preference.select import select_pair

from sdxl_sampling_helpers import CountingUNet, sdxl_inputs


class RecordingJudge:
    """Scores by mean brightness (optionally a tie for the final images) and records the timesteps."""

    def __init__(self, tie_at_zero: bool = False):
        self.timesteps: list[torch.Tensor] = []
        self.tie_at_zero = tie_at_zero

    def score(self, images, prompts, timesteps):
        self.timesteps.append(timesteps.clone())
        if self.tie_at_zero and bool((timesteps == 0).all()):
            return torch.zeros(images.shape[0])
        return images.float().mean(dim=(1, 2, 3)) * 100


def _run(pipe, judge, *, ending="sdxl", b=2, k=3, steps=8, divert=2, threshold=0.0, seed=0, unet=None):
    prompts, cond, neg, latents, g = sdxl_inputs(pipe, b, seed)
    return gradspo_sample(
        unet or pipe.unet, pipe.vae, pipe.scheduler, judge, prompts, cond, neg, latents,
        num_inference_steps=steps, divert_start_step=divert, num_candidates=k, threshold=threshold,
        ending=ending, guidance_scale=5.0, eta=1.0, generator=g,
    )


def _step_std(scheduler, t: torch.Tensor) -> torch.Tensor:
    """s_t of the DDIM step from t (eta 1), written out from the schedule, [N, 1, 1, 1]."""
    ac = scheduler.alphas_cumprod.double()
    t_prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    final = torch.tensor(float(scheduler.final_alpha_cumprod), dtype=torch.float64)
    a_t, a_prev = ac[t], torch.where(t_prev >= 0, ac[t_prev.clamp(min=0)], final)
    return ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt().float().view(-1, 1, 1, 1)


def test_the_sdxl_ending_judges_the_x0s_at_zero_and_keeps_no_last_step_tuple(sdxl):
    """8 steps, divert 2: branches at 2..6, judged at t_3..t_6 and then, instead of at t_7, the x0s each
    chain reaches by its own last step, at t = 0; tuples for steps 2..6, none for step 7."""
    judge, counting = RecordingJudge(), CountingUNet(sdxl.unet)
    b, k, steps, divert = 2, 3, 8, 2
    result = _run(sdxl, judge, b=b, k=k, steps=steps, divert=divert, unet=counting)
    ts = sdxl.scheduler.timesteps.tolist()
    assert [j.unique().tolist() for j in judge.timesteps] == [[ts[i]] for i in range(divert + 1, steps - 1)] + [[0]]
    assert result.judge_calls == steps - divert - 1 == 5
    # one guided pass per step: b rows up to and at the first branch, k*b after it (doubled for CFG)
    assert counting.batches == [2 * b] * (divert + 1) + [2 * k * b] * (steps - divert - 1) and result.unet_calls == steps
    assert result.scores.shape == (5, k, b) and result.valid.shape == (5, b) and result.choices.shape == (4, b)
    assert result.final_latents.shape == (k * b, 4, 8, 8)  # every chain's x0: none is continued after the end
    pairs = result.pairs
    for p in range(b):
        mine = pairs.prompt_index == p
        assert pairs.step_index[mine].tolist() == list(range(divert, steps - 1))
        assert pairs.timesteps[mine].tolist() == ts[divert : steps - 1]
    assert pairs.latents_lose is None  # every GradSPO tuple shares x_t


def test_the_final_pair_obeys_the_threshold(sdxl):
    """The sdxl ending applies the threshold to the final images (a tie at t = 0 keeps no t_{N-2} pair);
    the sd15 ending keeps every final pair whatever the threshold."""
    sdxl_run = _run(sdxl, RecordingJudge(tie_at_zero=True), threshold=0.01)
    assert not sdxl_run.valid[-1].any()
    assert (sdxl_run.pairs.step_index == 6).sum() == 0 and len(sdxl_run.pairs) > 0
    sd15_run = _run(sdxl, RecordingJudge(), ending="sd15", threshold=0.999)
    assert sd15_run.valid[-1].all() and not sd15_run.valid[:-1].any()
    assert sd15_run.pairs.step_index.tolist() == [7, 7]


def test_the_two_endings_agree_up_to_the_last_branch(sdxl):
    """Same seed: the same states, scores, choices and tuples up to step N-3, and the same x_t at the
    t_{N-2} branch; the sd15 ending then judges at t_{N-1} and branches once more."""
    ja, jc = RecordingJudge(), RecordingJudge()
    a, c = _run(sdxl, ja, ending="sdxl", seed=3), _run(sdxl, jc, ending="sd15", seed=3)
    assert torch.equal(a.scores[:-1], c.scores[:-2]) and torch.equal(a.choices, c.choices[:-2])
    assert all(torch.equal(x, y) for x, y in zip(ja.timesteps[:-1], jc.timesteps[:-2]))
    early_a, early_c = a.pairs.step_index < 6, c.pairs.step_index < 6
    for name in ("latents", "win", "lose", "timesteps", "prompt_index", "noise_delta"):
        assert torch.equal(getattr(a.pairs, name)[early_a], getattr(c.pairs, name)[early_c]), name
    assert torch.equal(a.pairs.latents[a.pairs.step_index == 6], c.pairs.latents[c.pairs.step_index == 6])
    assert c.final_latents.shape == (2, 4, 8, 8) and c.pairs.step_index.max() == 7


def test_every_offset_comes_from_its_own_pairs_draws(sdxl):
    """Win and lose share x_t and the posterior mean, so win - lose = s_t (z_w - z_l) = 2 s_t delta for
    every tuple, the final (t_{N-2}) one included: the winner is offset by +delta, the loser by -delta."""
    result = _run(sdxl, RecordingJudge(), b=3, k=4, steps=10, divert=3, seed=1)
    pairs = result.pairs
    assert (pairs.step_index == 8).sum() == 3  # the final pairs are there
    sched = sdxl.scheduler
    s_t = _step_std(sched, pairs.timesteps)
    torch.testing.assert_close((pairs.win - pairs.lose) / (2 * s_t), pairs.noise_delta, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close((pairs.lose - pairs.win) / (2 * s_t), -pairs.noise_delta, rtol=1e-3, atol=1e-4)
    mid = (pairs.win + pairs.lose) / 2  # the shared posterior mean: win = mid + s_t delta, lose = mid - s_t delta
    torch.testing.assert_close(pairs.win, mid + s_t * pairs.noise_delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pairs.lose, mid - s_t * pairs.noise_delta, rtol=1e-4, atol=1e-5)


def test_bad_arguments(sdxl):
    with pytest.raises(ValueError, match="divert_start_step"):
        _run(sdxl, RecordingJudge(), steps=6, divert=5)  # the sdxl ending's last branch is at N-2
    with pytest.raises(ValueError, match="ending"):
        _run(sdxl, RecordingJudge(), ending="sd21")
    assert _run(sdxl, RecordingJudge(), ending="sd15", steps=6, divert=5).pairs.step_index.tolist() == [5, 5]


def _official_sdxl_loop(pipe, judge, prompts, cond, neg, latents, g, *, steps, divert, k, threshold):
    """GradSPO's ``multi_sample_pipeline_sdxl`` restated for ``num_inner_step = 0``: its evaluation
    counter, per-segment caches of (x_t, x_{t-1}, t, draws), offsets from the segment's branch draws
    (``noise_added_cache[0]``), and at the last step a cached single step that is deleted again, its
    draws (``noise_temp``) giving the final pair's offset. Returns the tuples in their order, with
    ``delta_official`` (the code's offsets) and ``delta_branch`` (every pair's own branch draws)."""
    s, unet, vae = pipe.scheduler, pipe.unet, pipe.vae
    s.set_timesteps(steps)
    ts = s.timesteps
    last = len(ts) - 1
    b = len(prompts)
    ar = torch.arange(b)
    x = latents
    inner_step_left = 0
    current_cache, next_cache, t_cache, noise_cache = [], [], [], []
    out = {key: [] for key in ("latents", "win", "lose", "t", "delta_official", "delta_branch")}

    def fetch_x_t_1(eps, x_t, t, num_sample_per_step):
        """ddim_step_fetch_x_t_1: one posterior mean, ``num_sample_per_step`` draws of it ([k, b, ...]) or one."""
        mean, std = ddim_posterior(s, eps, t.expand(x_t.shape[0]), x_t, 1.0)
        if num_sample_per_step > 1:
            noise = randn_tensor((num_sample_per_step, *mean.shape), generator=g, dtype=mean.dtype)
            return mean[None] + std[None] * noise, noise
        noise = randn_tensor(mean.shape, generator=g, dtype=mean.dtype)
        return mean + std * noise, noise

    def collect(scores, win_noise_official, win_noise_branch):
        indices, valid = select_pair(scores, threshold)  # compare_fn
        cur = torch.stack(current_cache, dim=2)  # k, b, S, C, h, w
        nxt = torch.stack(next_cache, dim=2)
        idx = indices[:, :, None, None, None, None].expand(-1, -1, *cur.shape[2:])
        cur2, nxt2 = torch.gather(cur, 0, idx)[:, valid], torch.gather(nxt, 0, idx)[:, valid]  # 2, V, S, ...
        for j in range(cur2.shape[2]):
            assert torch.equal(cur2[0, :, j], cur2[1, :, j])  # a branch: one x_t
            out["latents"].append(cur2[0, :, j])
            out["win"].append(nxt2[0, :, j])
            out["lose"].append(nxt2[1, :, j])
            out["t"].append(t_cache[j].repeat(int(valid.sum())))
        out["delta_official"].append(win_noise_official[valid])  # one offset per segment
        out["delta_branch"].append(win_noise_branch[valid])

    def half_difference(scores, noise):  # (max_noise - min_noise) / 2 by the scores' argmax / argmin
        return (noise[scores.max(dim=0)[1], ar] - noise[scores.min(dim=0)[1], ar]) / 2

    for i, t in enumerate(ts):
        c = cond if x.shape[0] == b else cond.repeat(k)
        eps = guided_noise_pred(unet, x, t.expand(x.shape[0]), c, neg, 5.0)
        if (i >= divert and inner_step_left == 0) or i == last:
            inner_step_left = 0
            if i == divert:
                prev, noise = fetch_x_t_1(eps, x, t, k)
                current_cache.append(x.unsqueeze(0).repeat(k, 1, 1, 1, 1))
                next_cache.append(prev)
                t_cache.append(t)
                noise_cache.append(noise)
                x = prev.flatten(0, 1)
            elif i != last:
                x0, _ = predict_x0_and_eps(s, eps, t.expand(x.shape[0]), x)
                scores = judge.score(decode_latents(vae, x0), list(prompts) * k, t.expand(k * b)).float().view(k, b)
                delta = half_difference(scores, noise_cache[0])
                collect(scores, delta, delta)
                choice = torch.randint(0, k, (b,), generator=g)
                x_c = x.view(k, b, *x.shape[1:])[choice, ar]
                eps_c = eps.view(k, b, *x.shape[1:])[choice, ar]
                current_cache, t_cache = [x_c.unsqueeze(0).repeat(k, 1, 1, 1, 1)], [t]
                prev, noise = fetch_x_t_1(eps_c, x_c, t, k)
                next_cache, noise_cache = [prev], [noise]
                x = prev.flatten(0, 1)
            else:  # the last step: every chain steps to x0 on its own; the x0s are judged at t = 0
                prev, noise_temp = fetch_x_t_1(eps, x, t, 1)
                current_cache.append(x.view(k, b, *x.shape[1:]))
                next_cache.append(prev.view(k, b, *x.shape[1:]))
                t_cache.append(t)
                zeros = torch.zeros(k * b, dtype=torch.long)
                scores = judge.score(decode_latents(vae, prev.float()), list(prompts) * k, zeros).float().view(k, b)
                official = half_difference(scores, noise_temp.view(k, b, *x.shape[1:]))
                del next_cache[-1], t_cache[-1], current_cache[-1]  # the last transition is not kept
                collect(scores, official, half_difference(scores, noise_cache[0]))
        else:
            x, _ = fetch_x_t_1(eps, x, t, 1)
    return {key: torch.cat(v) for key, v in out.items()}


# (6, 4, ...): the only branch is at N-2; the official code cannot run that (its last step reads a batch
# size, ``batch_temp``, set only at an earlier judged step), spotune can. Threshold 0.1 drops some pairs,
# the final ones included (the tiny judge's final gaps are about 0.01).
@pytest.mark.parametrize("steps,divert,k,b,threshold,finals", [
    (20, 4, 4, 2, 0.0, True), (9, 1, 3, 3, 0.1, False), (6, 4, 2, 3, 0.0, True),
])
def test_matches_a_restatement_of_the_official_sdxl_loop(sdxl, steps, divert, k, b, threshold, finals):
    result = _run(sdxl, RecordingJudge(), b=b, k=k, steps=steps, divert=divert, threshold=threshold, seed=5)
    prompts, cond, neg, latents, g = sdxl_inputs(sdxl, b, 5)
    ref = _official_sdxl_loop(sdxl, RecordingJudge(), prompts, cond, neg, latents, g,
                              steps=steps, divert=divert, k=k, threshold=threshold)
    pairs = result.pairs
    assert len(pairs) == len(ref["t"]) > 0
    if threshold > 0:
        assert len(pairs) < b * (steps - divert - 1)  # some pairs were dropped
    for name in ("latents", "win", "lose"):
        assert torch.equal(getattr(pairs, name), ref[name]), name
    assert torch.equal(pairs.timesteps, ref["t"].long())
    assert int(pairs.step_index.max()) <= steps - 2  # no tuple for the last step
    final = pairs.step_index == steps - 2  # the t_{N-2} branch's pairs, labelled by the x0s
    assert bool(final.any()) == finals
    # every offset is the pair's own; the official code's differs only for the final pairs
    assert torch.equal(pairs.noise_delta, ref["delta_branch"])
    assert torch.equal(pairs.noise_delta[~final], ref["delta_official"][~final])
    if finals:
        assert not torch.allclose(pairs.noise_delta[final], ref["delta_official"][final])
