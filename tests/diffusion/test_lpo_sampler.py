"""LPO's sampler: the sigma thresholds of the authors' table, no decoding, b UNet rows per step, the LRM's
timesteps, and pairs kept exactly when the gap clears the step's threshold."""

from __future__ import annotations

import pytest
import torch

from spotune.diffusion.lpo_sampler import lpo_sample
from spotune.models.conditioning import Conditioning
from spotune.models.text import encode_prompts
from spotune.models.tiny import sd15_ddim_scheduler
from spotune.preference.lrm import load_lrm
from spotune.preference.select import best_worst_gap, sigma_threshold

# The authors' thresholds for 20 steps, SD1.5 (0.35 -> 0.5), t = 1, 51, ..., 951 (compare_funcs.py: their
# table of the DDIM eta-1 standard deviation indexed by t // 50, interpolated between min and max).
AUTHORS_SD15 = [0.3500, 0.3548, 0.3853, 0.3966, 0.4054, 0.4132, 0.4206, 0.4278, 0.4348, 0.4416,
                0.4483, 0.4548, 0.4612, 0.4674, 0.4734, 0.4791, 0.4847, 0.4900, 0.4951, 0.5000]


def test_sigma_thresholds_are_the_authors_table_at_20_steps_and_sensible_elsewhere():
    scheduler = sd15_ddim_scheduler()
    scheduler.set_timesteps(20)
    t = scheduler.timesteps  # 951 ... 1
    sd15 = sigma_threshold(scheduler, t, 0.35, 0.5).flip(0)  # ascending t, as the table
    assert sd15.tolist() == pytest.approx(AUTHORS_SD15, abs=6e-5)
    sdxl = sigma_threshold(scheduler, t, 0.45, 0.6).flip(0)
    assert sdxl.tolist() == pytest.approx([v + 0.1 for v in AUTHORS_SD15], abs=6e-5)  # SDXL's is 0.1 higher at every t
    for steps in (10, 50):
        scheduler.set_timesteps(steps)
        values = sigma_threshold(scheduler, scheduler.timesteps, 0.35, 0.5)
        assert values[0] == pytest.approx(0.5) and values[-1] == pytest.approx(0.35)  # noisiest first
        assert bool((values[1:] <= values[:-1]).all())


class CountingLRM:
    """The tiny LRM, counting its calls and the timesteps it is asked about."""

    judges_latents = True

    def __init__(self):
        self.lrm = load_lrm("builtin:tiny-lrm")
        self.calls = []

    def score(self, latents, prompts, timesteps):
        self.calls.append((latents.shape[0], timesteps.clone()))
        return self.lrm.score(latents, prompts, timesteps) * 20  # spread the untrained scores: some pairs pass


def _run(pipe, judge, *, b=3, steps=6, judge_timestep="authors", tree_row=None, rows=None):
    prompts = [f"prompt {i}" for i in range(b)]
    emb = Conditioning(encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts))
    neg = Conditioning(encode_prompts(pipe.tokenizer, pipe.text_encoder, [""]))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(b, 4, 8, 8, generator=g)
    unet = pipe.unet
    if rows is not None:
        def unet(x, t, **kwargs):
            rows.append(x.shape[0])
            return pipe.unet(x, t, **kwargs)
        unet.config = pipe.unet.config
    return lpo_sample(unet, pipe.vae, pipe.scheduler, judge, prompts, emb, neg, latents, num_inference_steps=steps,
                      num_candidates=4, threshold_range=(0.2, 0.5), judge_timestep=judge_timestep, generator=g,
                      tree_row=tree_row)


def test_no_decoding_b_rows_per_step_and_the_drawing_steps_timestep(tiny_pipeline, monkeypatch):
    decoded = []
    monkeypatch.setattr(tiny_pipeline.vae, "decode", lambda *a, **k: decoded.append(1))
    judge, rows = CountingLRM(), []
    result = _run(tiny_pipeline, judge, rows=rows)
    timesteps = tiny_pipeline.scheduler.timesteps.tolist()
    assert decoded == []  # no VAE decode, no pixel judge
    assert rows == [2 * 3] * 6 and result.unet_calls == 6  # one guided pass of the b chains per step (CFG: 2b rows)
    assert [n for n, _ in judge.calls] == [4 * 3] * 6  # the k*b candidates once per step
    from spotune.diffusion.sampler import judged_candidates, sampling_unet_evaluations

    assert sum(rows) // 2 == sampling_unet_evaluations("lpo", 3, 6, 0, 4)  # the study's cost column, as counted
    assert sum(n for n, _ in judge.calls) == judged_candidates("lpo", 3, 6, 0, 4)
    assert [c.unique().tolist() for _, c in judge.calls] == [[t] for t in timesteps]  # at the t that drew them
    thresholds = sigma_threshold(tiny_pipeline.scheduler, tiny_pipeline.scheduler.timesteps, 0.2, 0.5).tolist()
    assert result.thresholds == pytest.approx(thresholds)
    for s in range(6):  # kept exactly when the gap clears that step's threshold
        _, gap = best_worst_gap(result.scores[s])
        assert torch.equal(result.valid[s], gap > thresholds[s])
    assert 0 < int(result.valid.sum()) < result.valid.numel(), "the thresholds should keep some pairs and drop others"
    assert len(result.pairs) == int(result.valid.sum()) and result.pairs.step_index.tolist() == sorted(result.pairs.step_index.tolist())


def test_own_timesteps_and_a_recorded_tree(tiny_pipeline):
    own = CountingLRM()
    _run(tiny_pipeline, own, judge_timestep="own")
    timesteps = tiny_pipeline.scheduler.timesteps.tolist()
    assert [c.unique().tolist() for _, c in own.calls] == [[t] for t in timesteps[1:]] + [[0]]  # t-1; 0 after the last
    plain, recorded = _run(tiny_pipeline, CountingLRM()), _run(tiny_pipeline, CountingLRM(), tree_row=2)
    for name, tensor in plain.pairs.tensors().items():
        assert torch.equal(tensor, recorded.pairs.tensors()[name]), name
    tree = recorded.tree
    assert tree.sampler == "lpo" and [row.step_index for row in tree.steps] == list(range(6))
    for s, row in enumerate(tree.steps):
        assert row.threshold == pytest.approx(recorded.thresholds[s]) and row.kept == bool(recorded.valid[s, 2])
        assert row.continued == int(recorded.choices[s, 2]) and row.images.shape[:2] == (4, 3)
