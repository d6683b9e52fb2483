"""Invariants of SPO's step-wise sampler, on the tiny SD1.5-architecture pipeline."""

import pytest
import torch

from spotune.diffusion.ddim import ddim_step_with_logprob
from spotune.diffusion.sampler import guided_noise_pred, spo_sample
from spotune.models.conditioning import Conditioning
from spotune.models.text import encode_prompts


class RecordingJudge:
    """Scores by mean brightness and records every call (images, prompts, timesteps)."""

    def __init__(self):
        self.calls = []

    def score(self, images, prompts, timesteps):
        self.calls.append((images.shape[0], list(prompts), timesteps.clone()))
        return images.float().mean(dim=(1, 2, 3)) * 100


class CountingUNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet, self.batches = unet, []
        self.config = unet.config

    def forward(self, x, t, encoder_hidden_states):
        self.batches.append(x.shape[0])
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)


def _run(pipe, judge, b=3, k=4, steps=6, divert=2, threshold=0.0, seed=0, unet=None):
    prompts = [f"prompt {i}" for i in range(b)]
    emb = Conditioning(encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts))
    neg = Conditioning(encode_prompts(pipe.tokenizer, pipe.text_encoder, [""]))
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, 4, 8, 8, generator=g)
    result = spo_sample(
        unet or pipe.unet, pipe.vae, pipe.scheduler, judge, prompts, emb, neg, latents,
        num_inference_steps=steps, divert_start_step=divert, num_candidates=k, threshold=threshold,
        guidance_scale=5.0, eta=1.0, generator=g,
    )
    return result, prompts, emb, neg, latents


def test_calls_follow_the_algorithm(tiny_pipeline):
    judge = RecordingJudge()
    counting = CountingUNet(tiny_pipeline.unet)
    b, k, steps, divert = 3, 4, 6, 2
    result, prompts, *_ = _run(tiny_pipeline, judge, b, k, steps, divert, unet=counting)
    branching = steps - divert
    assert result.judge_calls == len(judge.calls) == branching
    # every call judges all k candidates of all b prompts, with the prompts in candidate-major order
    assert all(n == k * b and p == prompts * k for n, p, _ in judge.calls)
    # judged at the candidates' own timestep (t_{i+1}); the final candidates at t = 0
    timesteps = tiny_pipeline.scheduler.timesteps.tolist()
    for (i, (_, _, t)) in enumerate(judge.calls):
        expected = timesteps[divert + i + 1] if divert + i + 1 < steps else 0
        assert t.tolist() == [expected] * (k * b)
    # UNet: divert + 1 passes on b latents, then one pass on k*b candidates per branching step but the last;
    # each guided pass doubles its batch for classifier-free guidance.
    assert counting.batches == [2 * b] * (divert + 1) + [2 * k * b] * (branching - 1)
    assert result.unet_calls == len(counting.batches)


def _step_mean(s, out, pairs):
    """The DDIM posterior mean of each tuple's step (eta = 1)."""
    ac = s.alphas_cumprod
    t = pairs.timesteps
    prev_t = t - 1000 // s.num_inference_steps
    a_t = ac[t].view(-1, 1, 1, 1)
    a_prev = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], torch.as_tensor(s.final_alpha_cumprod)).view(-1, 1, 1, 1)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    x0 = (pairs.latents - (1 - a_t).sqrt() * out) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev - var).sqrt() * out


def test_pairs_share_x_t_and_chain_continues_from_a_candidate(tiny_pipeline):
    judge = RecordingJudge()
    result, prompts, emb, neg, _ = _run(tiny_pipeline, judge, threshold=0.0)
    pairs = result.pairs
    assert len(pairs) == int(result.valid.sum()) > 0
    assert not torch.equal(pairs.win, pairs.lose)
    assert torch.equal(pairs.cond.prompt_embeds, emb.prompt_embeds[pairs.prompt_index])
    # win and lose were both drawn from the step out of their stored x_t: under that step's Gaussian each
    # sits about half a nat (per dimension, averaged) below the density's peak, as a draw does; a wrong
    # x_t or t would put them many nats away.
    s = tiny_pipeline.scheduler
    out = guided_noise_pred(tiny_pipeline.unet, pairs.latents, pairs.timesteps, pairs.cond, neg, 5.0)
    _, logp_peak = ddim_step_with_logprob(s, out, pairs.timesteps, pairs.latents, 1.0, prev_sample=_step_mean(s, out, pairs))
    for side in (pairs.win, pairs.lose):
        _, logp = ddim_step_with_logprob(s, out, pairs.timesteps, pairs.latents, 1.0, prev_sample=side)
        assert torch.allclose(logp_peak - logp, torch.full_like(logp, 0.5), atol=0.2)
    # the continued state after each branching step is one of the k candidates (scores index it)
    assert result.choices.min() >= 0 and result.choices.max() < 4
    assert result.scores.shape == (4, 4, 3) and result.valid.shape == (4, 3)


def test_winner_has_the_best_score(tiny_pipeline):
    """Re-scoring the stored win/lose latents' step reproduces the judge's ordering at t = 0."""
    judge = RecordingJudge()
    result, *_ = _run(tiny_pipeline, judge, threshold=0.0, divert=5, steps=6)  # one branching step: the last
    pairs = result.pairs
    from spotune.diffusion.sampler import decode_latents

    win_scores = judge.score(decode_latents(tiny_pipeline.vae, pairs.win.float()), [""] * len(pairs), pairs.timesteps)
    lose_scores = judge.score(decode_latents(tiny_pipeline.vae, pairs.lose.float()), [""] * len(pairs), pairs.timesteps)
    assert (win_scores > lose_scores).all()
    scores = result.scores[-1]  # [k, b]
    torch.testing.assert_close(win_scores, scores.max(0).values[pairs.prompt_index])


def test_threshold_filters_pairs(tiny_pipeline):
    strict, *_ = _run(tiny_pipeline, RecordingJudge(), threshold=0.999)
    loose, *_ = _run(tiny_pipeline, RecordingJudge(), threshold=0.0)
    assert len(strict.pairs) < len(loose.pairs)


def test_same_seed_same_result(tiny_pipeline):
    a, *_ = _run(tiny_pipeline, RecordingJudge(), seed=3)
    b, *_ = _run(tiny_pipeline, RecordingJudge(), seed=3)
    assert torch.equal(a.final_latents, b.final_latents) and torch.equal(a.pairs.win, b.pairs.win)


def test_bad_arguments(tiny_pipeline):
    with pytest.raises(ValueError, match="divert_start_step"):
        _run(tiny_pipeline, RecordingJudge(), steps=4, divert=4)
    with pytest.raises(ValueError, match="num_candidates"):
        _run(tiny_pipeline, RecordingJudge(), k=1)


def test_trajectory_pairs_propagate_the_final_label_to_every_step(tiny_pipeline):
    from spotune.diffusion.sampler import trajectory_sample

    judge = RecordingJudge()
    b, steps, divert = 3, 6, 2
    prompts = [f"prompt {i}" for i in range(b)]
    emb = Conditioning(encode_prompts(tiny_pipeline.tokenizer, tiny_pipeline.text_encoder, prompts))
    neg = Conditioning(encode_prompts(tiny_pipeline.tokenizer, tiny_pipeline.text_encoder, [""]))
    g = torch.Generator().manual_seed(0)
    result = trajectory_sample(
        tiny_pipeline.unet, tiny_pipeline.vae, tiny_pipeline.scheduler, judge, prompts, emb, neg,
        torch.randn(2 * b, 4, 8, 8, generator=g), num_inference_steps=steps, divert_start_step=divert,
        threshold=0.0, generator=g,
    )
    assert result.judge_calls == len(judge.calls) == 1 and judge.calls[0][2].tolist() == [0] * (2 * b)
    pairs = result.pairs
    valid = int(result.valid.sum())
    assert len(pairs) == valid * (steps - divert) and pairs.latents_lose is not None
    # the two steps of a tuple start from different chains, and consecutive steps chain together
    assert not torch.equal(pairs.latents, pairs.latents_lose)
    first, second = pairs.select(pairs.step_index == divert), pairs.select(pairs.step_index == divert + 1)
    assert torch.equal(first.win, second.latents) and torch.equal(first.lose, second.latents_lose)


def test_sampling_unet_evaluations_counts_every_samplers_latent_rows(tiny_pipeline):
    """The cost formula against the rows the three samplers really pass through the UNet (halved for CFG)."""
    from spotune.diffusion.gradspo_sampler import gradspo_sample
    from spotune.diffusion.sampler import judged_candidates, sampling_unet_evaluations, trajectory_sample

    b, k, steps, divert = 3, 4, 6, 2
    prompts = [f"prompt {i}" for i in range(b)]
    emb = Conditioning(encode_prompts(tiny_pipeline.tokenizer, tiny_pipeline.text_encoder, prompts))
    neg = Conditioning(encode_prompts(tiny_pipeline.tokenizer, tiny_pipeline.text_encoder, [""]))
    for sampler in (spo_sample, gradspo_sample):
        counting = CountingUNet(tiny_pipeline.unet)
        g = torch.Generator().manual_seed(0)
        sampler(counting, tiny_pipeline.vae, tiny_pipeline.scheduler, RecordingJudge(), prompts, emb, neg,
                torch.randn(b, 4, 8, 8, generator=g), num_inference_steps=steps, divert_start_step=divert,
                num_candidates=k, threshold=0.0, guidance_scale=5.0, eta=1.0, generator=g)
        assert sum(counting.batches) // 2 == sampling_unet_evaluations("step", b, steps, divert, k), sampler
    judge = RecordingJudge()
    spo_sample(tiny_pipeline.unet, tiny_pipeline.vae, tiny_pipeline.scheduler, judge, prompts, emb, neg,
               torch.randn(b, 4, 8, 8), num_inference_steps=steps, divert_start_step=divert, num_candidates=k,
               threshold=0.0, guidance_scale=5.0, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert sum(n for n, _, _ in judge.calls) == judged_candidates("step", b, steps, divert, k)
    counting = CountingUNet(tiny_pipeline.unet)
    g = torch.Generator().manual_seed(0)
    trajectory_sample(counting, tiny_pipeline.vae, tiny_pipeline.scheduler, RecordingJudge(), prompts, emb, neg,
                      torch.randn(2 * b, 4, 8, 8, generator=g), num_inference_steps=steps, divert_start_step=divert,
                      threshold=0.0, generator=g)
    assert sum(counting.batches) // 2 == sampling_unet_evaluations("trajectory", b, steps, divert, k) == b * 2 * steps
    assert sampling_unet_evaluations("step", 1, 20, 4, 4) == 65
    with pytest.raises(ValueError, match="unknown sampler"):
        sampling_unet_evaluations("segment", 1, 20, 4, 4)


def test_sample_micro_batch_size_splits_the_unet_rows_and_changes_no_result(tiny_pipeline, sdxl):
    from spotune.diffusion.sampler import RowChunkedUNet

    whole, *_ = _run(tiny_pipeline, RecordingJudge())
    counting = CountingUNet(tiny_pipeline.unet)
    split, *_ = _run(tiny_pipeline, RecordingJudge(), unet=RowChunkedUNet(counting, 5))
    assert max(counting.batches) == 5 and 2 * 4 * 3 in [sum(counting.batches[i:i + 5]) for i in range(len(counting.batches))]
    # The same pairs and chains; values equal up to floating-point order (smaller GEMMs sum differently).
    assert torch.equal(split.valid, whole.valid) and torch.equal(split.choices, whole.choices)
    torch.testing.assert_close(split.final_latents, whole.final_latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(split.pairs.latents, whole.pairs.latents, rtol=1e-4, atol=1e-4)
    # SDXL's pooled embedding and time ids (added_cond_kwargs) are split with the rows.
    unet = sdxl.unet
    n = 6
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, unet.config.in_channels, 8, 8, generator=g)
    t = torch.full((n,), 500)
    hidden = torch.randn(n, 4, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(n, unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim, generator=g),
             "time_ids": torch.randn(n, 6, generator=g)}
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        got = RowChunkedUNet(unet, 4)(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
