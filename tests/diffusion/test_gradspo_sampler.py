"""GradSPO's sampler on the tiny pipeline: SPO's states, the stored noise offset, and the last-step rule."""

import torch

from spotune.diffusion.gradspo_sampler import gradspo_sample
from spotune.diffusion.sampler import spo_sample
from spotune.models.conditioning import Conditioning
from spotune.models.text import encode_prompts


class BrightnessJudge:
    def __init__(self):
        self.timesteps = []

    def score(self, images, prompts, timesteps):
        self.timesteps.append(timesteps.clone())
        return images.float().mean(dim=(1, 2, 3)) * 100


def _run(sampler, pipe, threshold, b=3, k=4, steps=6, divert=2, seed=0):
    prompts = [f"prompt {i}" for i in range(b)]
    emb = Conditioning(encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts))
    neg = Conditioning(encode_prompts(pipe.tokenizer, pipe.text_encoder, [""]))
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, 4, 8, 8, generator=g)
    judge = BrightnessJudge()
    result = sampler(
        pipe.unet, pipe.vae, pipe.scheduler, judge, prompts, emb, neg, latents,
        num_inference_steps=steps, divert_start_step=divert, num_candidates=k, threshold=threshold,
        guidance_scale=5.0, eta=1.0, generator=g,
    )
    return result, judge


def test_same_states_as_spo_and_every_final_pair_kept(tiny_pipeline):
    # A threshold that drops some pairs at the earlier steps, so the last-step rule is visible.
    threshold = 0.05
    spo, spo_judge = _run(spo_sample, tiny_pipeline, threshold)
    grad, grad_judge = _run(gradspo_sample, tiny_pipeline, threshold)
    assert torch.equal(spo.choices, grad.choices) and torch.equal(spo.final_latents, grad.final_latents)
    assert torch.equal(spo.scores[:-1], grad.scores[:-1]) and torch.equal(spo.valid[:-1], grad.valid[:-1])
    assert not spo.valid[:-1].all(), "the threshold should drop some earlier pairs"
    assert grad.valid[-1].all()  # GradSPO keeps every final pair
    last_step = 5
    for name in ("latents", "win", "lose", "timesteps", "prompt_index"):
        a, b = getattr(spo.pairs, name), getattr(grad.pairs, name)
        early_a, early_b = a[spo.pairs.step_index < last_step], b[grad.pairs.step_index < last_step]
        assert torch.equal(early_a, early_b), name
    assert (grad.pairs.step_index == last_step).sum() == 3
    # the final candidates are judged at the last timestep (1 on SD1.5's schedule here), not at 0
    t_last = int(tiny_pipeline.scheduler.timesteps[-1])
    assert t_last == 1
    assert spo_judge.timesteps[-1].unique().tolist() == [0]
    assert grad_judge.timesteps[-1].unique().tolist() == [t_last]
    assert all(torch.equal(a, b) for a, b in zip(spo_judge.timesteps[:-1], grad_judge.timesteps[:-1]))


def test_noise_delta_is_half_the_difference_of_the_candidates_draws(tiny_pipeline):
    result, _ = _run(gradspo_sample, tiny_pipeline, threshold=0.0)
    pairs = result.pairs
    assert pairs.noise_delta is not None and pairs.noise_delta.shape == pairs.win.shape
    assert pairs.noise_delta.dtype == torch.float32
    # Winner and loser share the posterior mean, so win - lose = s_t (z_w - z_l) = 2 s_t delta,
    # with s_t (eta 1) written out from the schedule: the loser's offset is -delta.
    sched = tiny_pipeline.scheduler
    ac = sched.alphas_cumprod.double()
    t = pairs.timesteps
    t_prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
    a_t = ac[t]
    a_prev = torch.where(t_prev >= 0, ac[t_prev.clamp(min=0)], torch.tensor(float(sched.final_alpha_cumprod), dtype=torch.float64))
    s_t = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt().float().view(-1, 1, 1, 1)
    torch.testing.assert_close((pairs.win - pairs.lose) / (2 * s_t), pairs.noise_delta, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close((pairs.lose - pairs.win) / (2 * s_t), -pairs.noise_delta, rtol=1e-3, atol=1e-4)
    # standard-normal draws: their half-differences have variance about 1/2
    assert 0.3 < float(pairs.noise_delta.var()) < 0.7
