"""PickScore relabelling (SPO's SDXL step-aware model): the label rule, the clean images' pixels, the cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from spotune.data.pickapic import PickAPicPairs, collate_pairs, image_to_tensor, synthetic_pairs, write_pairs_parquet
from spotune.preference.clip_judge import CLIP_MEAN, CLIP_STD, PickScoreJudge
from spotune.preference.loading import BUILTIN_TINY_CLIP
from spotune.preference.relabel import ClipPixels, LabelCache, PickScoreRelabeller, pickscore_labels


def _expected(s0: float, s1: float, margin: float) -> tuple[float, float]:
    """SPO's update_as_pickscore_label for one pair, written out: softmax, then a margin on p0 - p1."""
    p0 = math.exp(s0) / (math.exp(s0) + math.exp(s1))
    p1 = 1.0 - p0
    if p0 - p1 > margin:
        return (1.0, 0.0)
    if p1 - p0 > margin:
        return (0.0, 1.0)
    return (0.5, 0.5)


def test_labels_follow_the_softmax_margin_on_hand_made_scores():
    # p0 - p1 = tanh((s0 - s1) / 2): with margin 0.1 the tie band is |s0 - s1| <= 2 atanh(0.1) = 0.2007.
    s0 = torch.tensor([21.0, 20.0, 20.2, 20.0, 20.21, 20.0, 22.5, 19.0, 20.0])
    s1 = torch.tensor([20.0, 21.0, 20.0, 20.2, 20.0, 20.21, 22.5, 25.0, 20.0])
    labels = pickscore_labels(s0, s1, 0.1)
    expected = [_expected(a, b, 0.1) for a, b in zip(s0.tolist(), s1.tolist())]
    assert [tuple(r) for r in labels.tolist()] == expected
    # The rule's own cases: decisive either way, ties inside the band, its edges on the right side.
    assert expected == [(1, 0), (0, 1), (0.5, 0.5), (0.5, 0.5), (1, 0), (0, 1), (0.5, 0.5), (0, 1), (0.5, 0.5)]


def test_a_wider_margin_makes_more_ties_and_margin_zero_only_equal_scores():
    s0, s1 = torch.tensor([20.0, 20.0, 20.0]), torch.tensor([20.5, 21.0, 20.0])
    assert pickscore_labels(s0, s1, 0.0).tolist() == [[0, 1], [0, 1], [0.5, 0.5]]
    assert pickscore_labels(s0, s1, 0.3).tolist() == [[0.5, 0.5], [0, 1], [0.5, 0.5]]  # tanh(0.25) = 0.245
    assert pickscore_labels(s0, s1, 0.5).tolist() == [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]  # tanh(0.5) = 0.462


def test_clip_pixels_are_the_transformers_clip_processor_output():
    """PickScore's processor (CLIP-ViT-H-14's: shortest side 224 bicubic, centre crop, CLIP mean/std) on
    non-square images of odd sizes, where long-side truncation and crop offsets matter."""
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    rng = np.random.default_rng(0)
    for h, w in ((37, 61), (50, 33), (24, 24), (100, 77)):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        reference = torch.as_tensor(np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]))
        torch.testing.assert_close(ClipPixels(24, CLIP_MEAN, CLIP_STD)(image), reference, atol=1e-5, rtol=0)


def test_views_pixels_are_the_spm_dataset_processor_output():
    """SPO's SPM dataset: the CLIP processor with shortest_edge = crop = resolution, no normalisation, then
    Normalize(0.5, 0.5); non-square sizes whose scaled long side is fractional (truncated, not rounded)."""
    from transformers import CLIPImageProcessorPil

    size = 40
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                      do_normalize=False)
    rng = np.random.default_rng(1)
    for h, w in ((27, 43), (43, 27), (30, 45), (64, 50)):  # 40 * 43 / 27 = 63.7: 63, not 64
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        reference = torch.as_tensor(np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]))
        torch.testing.assert_close(image_to_tensor(image, size), (reference - 0.5) / 0.5, atol=1e-5, rtol=0)


def test_label_cache_merge_keeps_known_labels():
    cache = LabelCache(4)
    cache.put(torch.tensor([1]), torch.tensor([[1.0, 0.0]]))
    other = torch.full((4, 2), float("nan"))
    other[1], other[3] = torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5])
    cache.merge(other)
    assert cache.known == 2 and cache.get(torch.tensor([1, 3])).tolist() == [[1, 0], [0.5, 0.5]]
    assert cache.missing(torch.tensor([0, 1, 2, 3])).tolist() == [True, False, True, False]


@pytest.fixture()
def judge() -> PickScoreJudge:
    return PickScoreJudge.from_pretrained(BUILTIN_TINY_CLIP)


def test_batches_get_pickscores_labels_once_per_pair(judge, tmp_path):
    captions, images_0, images_1, _ = synthetic_pairs(6, 32, seed=3)
    relabeller = PickScoreRelabeller(judge, margin=0.01)
    clip = relabeller.pixels
    scores_0 = judge.score_pixel_values(torch.stack([clip(Image.fromarray(a)) for a in images_0]), captions)
    scores_1 = judge.score_pixel_values(torch.stack([clip(Image.fromarray(a)) for a in images_1]), captions)
    expected = [_expected(a, b, 0.01) for a, b in zip(scores_0.tolist(), scores_1.tolist())]
    assert len(set(expected)) > 1  # the tiny judge splits these pairs more than one way
    # Written with the opposite of PickScore's labels (and a tie where it decides): every label must change.
    flipped = [(b, a) if a != b else (1.0, 0.0) for a, b in expected]
    pairs = PickAPicPairs(write_pairs_parquet(tmp_path / "p.parquet", captions, images_0, images_1, flipped), resolution=32)
    pairs.clip_pixels = clip

    calls = []
    original = judge.score_pixel_values
    judge.score_pixel_values = lambda pixels, prompts, t=None: calls.append(len(prompts)) or original(pixels, prompts, t)
    cache = LabelCache(len(pairs))
    first = relabeller.relabel_batch(collate_pairs([pairs[i] for i in (4, 0, 2)]), cache)
    assert [tuple(r) for r in torch.stack([first.label_0, first.label_1], 1).tolist()] == [expected[i] for i in (4, 0, 2)]
    assert calls == [3, 3]  # both images of the three pairs, once
    batch = relabeller.relabel_batch(collate_pairs([pairs[i] for i in range(6)]), cache)
    assert calls == [3, 3, 3, 3]  # only the three pairs not seen before
    assert [tuple(r) for r in torch.stack([batch.label_0, batch.label_1], 1).tolist()] == expected
    assert all(tuple(r) != e for r, e in zip(torch.stack([batch.label_0, batch.label_1], 1).tolist(), flipped))
    assert batch.num_pairs.tolist() == collate_pairs([pairs[i] for i in range(6)]).num_pairs.tolist()


def test_relabelling_needs_the_clean_images_pixels(judge, tmp_path):
    pairs = PickAPicPairs(write_pairs_parquet(tmp_path / "p.parquet", *synthetic_pairs(2, 32)), resolution=32)
    with pytest.raises(ValueError, match="clip_pixels"):
        PickScoreRelabeller(judge).relabel_batch(collate_pairs([pairs[0], pairs[1]]), LabelCache(2))
