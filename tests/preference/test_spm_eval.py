"""Noisy x0-prediction views and the per-timestep pairwise accuracy, on the tiny SD1.5 pipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from spotune.data.pickapic import PairBatch, collate_pairs, synthetic_pairs
from spotune.preference import StepAwarePreferenceModel
from spotune.preference.noisy_views import NoisyViewMaker
from spotune.preference.spm_eval import (
    SPM_EVAL_TIMESTEPS,
    TimestepAccuracy,
    accuracy_csv,
    evaluate_pair_accuracy,
    format_accuracy_table,
    pair_correctness,
)


class BrightBorderJudge(torch.nn.Module):
    """Scores an image by the brightness of its border: the clean synthetic images win."""

    def score(self, images, prompts, timesteps=None):
        border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
        return border.float().mean(dim=(1, 2))


def _batches(n: int, batch_size: int, seed: int = 0) -> list[PairBatch]:
    captions, im0, im1, labels = synthetic_pairs(n, 32, seed)
    items = [
        {
            "pixel_values_0": torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1,
            "pixel_values_1": torch.from_numpy(b).permute(2, 0, 1).float() / 127.5 - 1,
            "caption": c, "label_0": l[0], "label_1": l[1], "num_pairs": 1.0, "row": f"row {i}",
        }
        for i, (c, a, b, l) in enumerate(zip(captions, im0, im1, labels))
    ]
    return [collate_pairs(items[i : i + batch_size]) for i in range(0, n, batch_size)]


def test_views_are_the_ddim_step_x0_prediction(tiny_pipeline, make_images):
    """Against diffusers' own DDIMScheduler.step after set_timesteps(1000), one sample at a time."""
    pipe = tiny_pipeline
    maker = NoisyViewMaker(pipe, guidance_scale=5.0, negative_prompt="")
    p0, p1, captions, t = make_images(2, seed=1), make_images(2, seed=2), ["a red circle", "a blue square"], torch.tensor([120, 830])
    views_0, views_1 = maker(p0, p1, captions, t, torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)  # the same draws, in the same order
    z = pipe.vae.encode(torch.cat([p0, p1])).latent_dist.sample(generator=g) * pipe.vae.config.scaling_factor
    noise = torch.randn((2, *z.shape[1:]), generator=g).repeat(2, 1, 1, 1)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(1000)
    tt = t.repeat(2)
    x_t = scheduler.add_noise(z, noise, tt)
    ids = lambda texts: pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids  # noqa: E731
    with torch.no_grad():
        cond = pipe.text_encoder(ids(captions * 2))[0]
        uncond = pipe.text_encoder(ids([""] * 4))[0]
        x0 = []
        for i in range(4):
            out = pipe.unet(torch.cat([x_t[i : i + 1]] * 2), tt[i], encoder_hidden_states=torch.cat([uncond[i : i + 1], cond[i : i + 1]])).sample
            guided = out[:1] + 5.0 * (out[1:] - out[:1])
            x0.append(scheduler.step(guided, int(tt[i]), x_t[i : i + 1]).pred_original_sample)
        expected = pipe.vae.decode(torch.cat(x0) / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(torch.cat([views_0, views_1]), expected, rtol=1e-4, atol=1e-4)


def test_one_noise_per_pair_and_views_change_with_t(tiny_pipeline, make_images):
    maker = NoisyViewMaker(tiny_pipeline, guidance_scale=1.0)
    same = make_images(2, seed=3)
    v0, v1 = maker(same, same.clone(), ["a", "b"], torch.tensor([500, 500]), torch.Generator().manual_seed(0))
    # The VAE posterior is sampled per image, so identical images differ only through that draw:
    # with a shared noise, both views stay close; unshared noise at t = 500 would move them far apart.
    assert (v0 - v1).abs().mean() < 0.05
    late, _ = maker(same, same, ["a", "b"], torch.tensor([900, 900]), torch.Generator().manual_seed(0))
    assert (late - v0).abs().mean() > 1e-3
    assert v0.shape == (2, 3, 32, 32) and v0.dtype == torch.float32


def test_pair_correctness_counts_strict_wins_and_ties_as_spo_does():
    judge = BrightBorderJudge()
    bright, dark = torch.ones(1, 3, 4, 4), -torch.ones(1, 3, 4, 4)
    images_0 = torch.cat([bright, dark, bright, bright, bright, bright])
    images_1 = torch.cat([dark, bright, dark, bright, dark, bright])
    label_0 = torch.tensor([1.0, 1.0, 0.5, 1.0, 0.0, 0.5])
    label_1 = torch.tensor([0.0, 0.0, 0.5, 0.0, 1.0, 0.5])
    result = pair_correctness(judge, images_0, images_1, ["x"] * 6, torch.zeros(6), label_0, label_1)
    # (correct, decisive, tie, tie scored apart): right, wrong, tie scored apart, equal scores (wrong),
    # wrong, tie with equal scores
    assert result.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]
    row = TimestepAccuracy(0, *result.sum(0).tolist())
    assert row.accuracy == 1 / 4  # ties left out
    # SPO's figure, written out as spm_task.py computes it: (p0 > p1) * label_0 + (p0 < p1) * label_1 per pair
    s0, s1 = judge.score(images_0, ["x"] * 6), judge.score(images_1, ["x"] * 6)
    spo = ((s0 > s1).float() * label_0 + (s0 < s1).float() * label_1).mean()
    assert row.accuracy_with_ties == pytest.approx(float(spo)) == pytest.approx((1 + 0.5) / 6)


def test_accuracy_is_reported_at_all_five_timesteps(tiny_pipeline):
    batches = _batches(4, 4)
    decisive = sum(int((b.label_0 != b.label_1).sum()) for b in batches)
    maker = NoisyViewMaker(tiny_pipeline, guidance_scale=1.0)
    rows = evaluate_pair_accuracy(BrightBorderJudge(), maker, batches, generator=torch.Generator().manual_seed(0))
    assert [r.timestep for r in rows] == list(SPM_EVAL_TIMESTEPS) == [0, 251, 501, 701, 951]
    assert all(r.total == decisive > 0 for r in rows)
    assert rows[0].accuracy == 1.0  # the clean images: the oracle judge agrees with every label

    table = format_accuracy_table(rows)
    assert all(f"| {t} |" in table for t in SPM_EVAL_TIMESTEPS) and "| 1.0000 |" in table
    csv = accuracy_csv([(5, r) for r in rows]).splitlines()
    assert csv[0] == "step,timestep,accuracy,correct,total,accuracy_with_ties,ties,ties_apart"
    assert csv[1].startswith("5,0,1.000000,")
    assert TimestepAccuracy(0, 0, 0).accuracy != TimestepAccuracy(0, 0, 0).accuracy  # nan without pairs


def test_a_seeded_evaluation_repeats_exactly(tiny_pipeline):
    batches = _batches(4, 4, seed=1)
    maker = NoisyViewMaker(tiny_pipeline, guidance_scale=1.0)
    spm = StepAwarePreferenceModel.from_pretrained("builtin:tiny-clip")
    first = evaluate_pair_accuracy(spm, maker, batches, [0, 501], generator=torch.Generator().manual_seed(3))
    again = evaluate_pair_accuracy(spm, maker, batches, [0, 501], generator=torch.Generator().manual_seed(3))
    assert first == again
    with pytest.raises(ValueError, match="outside"):
        evaluate_pair_accuracy(spm, maker, batches, timesteps=[0, 1000])
