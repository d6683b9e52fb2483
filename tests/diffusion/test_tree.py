"""The sampling tree recorded by the step-wise samplers: what each row says is what the sampler did.

For SPO's SD1.5 sampler, both GradSPO endings and the SDXL sampler, on the tiny pipelines: recording
changes nothing the sampler returns; each judged row's winner and loser are the argmax and argmin of
its scores, it is kept iff the softmax gap clears the threshold (and that is the sampler's own
``valid``), its continued candidate is the sampler's choice, and its thumbnails are the candidates'.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from spotune.diffusion.gradspo_sampler import gradspo_sample
from spotune.diffusion.sampler import spo_sample
from spotune.diffusion.segment_sampler import judged_steps, segment_spo_sample
from spotune.models.conditioning import Conditioning
from spotune.models.text import encode_prompts
from spotune.recipes.trees import tree_paths, write_tree

from sdxl_sampling_helpers import sdxl_inputs

THRESHOLD = 0.02  # drops some pairs and keeps others on these tiny models


class BrightnessJudge:
    def score(self, images, prompts, timesteps):
        return images.float().mean(dim=(1, 2, 3)) * 100


def _sd15(pipe, sampler, tree_row, **kwargs):
    b = 3
    prompts = [f"prompt {i}" for i in range(b)]
    emb = Conditioning(encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts))
    neg = Conditioning(encode_prompts(pipe.tokenizer, pipe.text_encoder, [""]))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(b, 4, 8, 8, generator=g)
    return sampler(pipe.unet, pipe.vae, pipe.scheduler, BrightnessJudge(), prompts, emb, neg, latents,
                   num_inference_steps=6, divert_start_step=2, num_candidates=4, threshold=THRESHOLD,
                   guidance_scale=5.0, eta=1.0, generator=g, tree_row=tree_row, **kwargs)


def _same_result(a, b):
    for name, tensor in a.pairs.tensors().items():
        assert torch.equal(tensor, b.pairs.tensors()[name]), name
    for name in ("final_latents", "scores", "valid", "choices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _check_judged_row(row, result, s, p, threshold):
    scores = result.scores[s, :, p]
    assert row.scores == pytest.approx(scores.tolist())
    assert row.winner == int(scores.argmax()) and row.loser == int(scores.argmin())
    best, worst = torch.softmax(torch.stack([scores.max(), scores.min()]), 0).tolist()
    assert row.gap == pytest.approx(best - worst, abs=1e-6)
    assert row.kept == bool(result.valid[s, p])
    if threshold is not None:
        assert row.threshold == threshold and row.kept == (row.gap > threshold)
    assert row.images.dtype == torch.uint8 and row.images.shape[:2] == (scores.numel(), 3)


@pytest.mark.parametrize("sampler, kwargs, name", [
    (spo_sample, {}, "spo"),
    (gradspo_sample, {"ending": "sd15"}, "gradspo-sd15"),
    (gradspo_sample, {"ending": "sdxl"}, "gradspo-sdxl"),
])
def test_branching_tree_rows_are_what_the_sampler_did(tiny_pipeline, sampler, kwargs, name):
    plain = _sd15(tiny_pipeline, sampler, None, **kwargs)
    recorded = _sd15(tiny_pipeline, sampler, 1, **kwargs)
    _same_result(plain, recorded)
    assert plain.tree is None
    tree = recorded.tree
    assert tree.sampler == name and tree.prompt_row == 1
    assert [row.step_index for row in tree.steps] == recorded.judged_steps
    assert recorded.judged_steps == (list(range(2, 5)) if name == "gradspo-sdxl" else list(range(2, 6)))
    timesteps = tiny_pipeline.scheduler.timesteps.tolist()
    kept_any = dropped_any = False
    for s, row in enumerate(tree.steps):
        last_row = s == len(tree.steps) - 1
        threshold = None if (name == "gradspo-sd15" and last_row) else THRESHOLD
        _check_judged_row(row, recorded, s, 1, threshold)
        assert row.timestep == timesteps[row.step_index]
        if not last_row:
            expected_judge_t = timesteps[row.step_index + 1]  # the candidates' own noise level
        elif name == "gradspo-sd15":
            expected_judge_t = timesteps[row.step_index]  # GradSPO judges its final candidates at t_{N-1}
        else:
            expected_judge_t = 0  # final latents
        assert row.judge_timestep == expected_judge_t
        if name == "gradspo-sdxl" and last_row:
            assert row.continued is None  # the final branch's chains each end; none is continued
        else:
            assert row.continued == int(recorded.choices[s, 1])
        kept_any |= bool(row.kept)
        dropped_any |= not row.kept
    assert kept_any and (dropped_any or name == "gradspo-sd15"), "the threshold should both keep and drop here"


def test_sdxl_tree_has_a_row_per_step_after_the_branch(sdxl):
    prompts, cond, neg, latents, g = sdxl_inputs(sdxl, 2, 0)
    args = (sdxl.unet, sdxl.vae, sdxl.scheduler, BrightnessJudge(), prompts, cond, neg)
    kwargs = dict(num_inference_steps=10, divert_start_step=2, num_candidates=2, num_inner_steps=2,
                  threshold=THRESHOLD, guidance_scale=5.0, eta=1.0)
    plain = segment_spo_sample(*args, latents.clone(), generator=torch.Generator().manual_seed(0), **kwargs)
    recorded = segment_spo_sample(*args, latents.clone(), generator=torch.Generator().manual_seed(0), tree_row=0, **kwargs)
    _same_result(plain, recorded)
    tree = recorded.tree
    assert [row.step_index for row in tree.steps] == list(range(3, 10))
    judged = judged_steps(10, 2, 2)
    assert recorded.judged_steps == judged == [5, 8, 9]
    s = 0
    for row in tree.steps:
        assert row.images.shape[:2] == (2, 3)
        if row.step_index not in judged:
            assert row.judge_timestep is None and row.scores is None and row.kept is None
            continue
        _check_judged_row(row, recorded, s, 0, THRESHOLD)
        if row.step_index == 9:
            assert row.judge_timestep == 0 and row.continued is None
        else:
            assert row.continued == int(recorded.choices[s, 0])
        s += 1


def test_written_tree_has_its_picture_and_numbers(tiny_pipeline, tmp_path):
    tree = _sd15(tiny_pipeline, spo_sample, 0).tree
    png, record = tree_paths(tmp_path, 7)
    written, picture = write_tree(tmp_path, tree, "a red circle", 7)
    assert written == png and png.name == "iter-00000007.png"
    numbers = json.loads(record.read_text())
    assert numbers["prompt"] == "a red circle" and numbers["image"] == png.name and numbers["candidates"] == 4
    assert [row["winner"] for row in numbers["steps"]] == [row.winner for row in tree.steps]
    with Image.open(png) as image:
        assert image.size == picture.size and image.height > len(tree.steps) * tree.steps[0].images.shape[-2]
        # winner frames (green) and the continued marks (blue) are drawn
        colours = {c for _, c in image.convert("RGB").getcolors(1 << 20)}
        assert (46, 158, 68) in colours and (40, 96, 220) in colours
