"""Generic preference data: labels blend the rater's criteria, and train-spm's reader reads the files exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest

from spotune.toyworld.preferences import RaterWeights, label_pairs
from spotune.toyworld.render import Scene, render, sample_scene
from spotune.toyworld.world import all_prompts


def _pairs(n: int, seed: int):
    """n pairs of renders of one prompt each: image 0 clean, image 1 with 3 specks, same size and place."""
    rng = random.Random(seed)
    captions, images = [], []
    for i in range(n):
        prompt = all_prompts()[i % len(all_prompts())]
        cluttered = sample_scene(prompt, rng, num_specks=3)
        clean = Scene(prompt, cluttered.cx, cluttered.cy, cluttered.radius)
        captions.append(prompt.caption)
        images.append(np.stack([render(clean), render(cluttered)]))
    return captions, np.stack(images)


def test_noise_free_labels_follow_the_utility_and_here_the_cleaner_image():
    captions, images = _pairs(40, 0)
    data = label_pairs(captions, images, RaterWeights(aesthetic=1.0, layout=0.0, alignment=0.0), rng=None)
    assert (data.labels[:, 0] == 1).all()  # the clean image always wins when only aesthetics count
    assert data.label_agrees_with_aesthetics == 1.0
    assert (data.aesthetic[:, 0] > data.aesthetic[:, 1]).all()
    assert (data.cleanliness[:, 0] > data.cleanliness[:, 1]).all()
    assert (data.aligned == 1).all()


def test_drawn_labels_are_seeded_and_noisy_but_mostly_right():
    captions, images = _pairs(100, 1)
    weights = RaterWeights(aesthetic=1.0, layout=0.0, alignment=0.0, decisiveness=1.0)
    a = label_pairs(captions, images, weights, rng=random.Random(5))
    b = label_pairs(captions, images, weights, rng=random.Random(5))
    assert np.array_equal(a.labels, b.labels)
    agree = a.label_agrees_with_aesthetics
    assert 0.6 < agree < 1.0  # Bradley-Terry draws flip some close calls
    decisive = label_pairs(captions, images, RaterWeights(1.0, 0.0, 0.0, decisiveness=20.0), rng=random.Random(5))
    assert decisive.label_agrees_with_aesthetics > agree  # a more decisive rater flips fewer
    assert a.label_follows_utility == agree  # aesthetics is all this rater weighs


def test_layout_weight_can_outvote_aesthetics():
    captions, images = _pairs(60, 2)
    # Image 1 gets a bigger subject by swapping in a larger render of the same clean scene for image 0's rival.
    rng = random.Random(3)
    for i, caption in enumerate(captions):
        prompt = all_prompts()[i % len(all_prompts())]
        images[i, 1] = render(Scene(prompt, 16, 16, 10.0, sample_scene(prompt, rng, num_specks=1).specks))
        images[i, 0] = render(Scene(prompt, 12.5, 12.5, 6.5))  # smaller and off-centre: worse layout on both counts
    layout_only = label_pairs(captions, images, RaterWeights(aesthetic=0.0, layout=1.0, alignment=0.0), rng=None)
    assert (layout_only.labels[:, 1] == 1).all()
    assert layout_only.label_agrees_with_aesthetics == 0.0


def test_the_layout_term_weighs_centring_as_well_as_size():
    """Same subject size, one centred and one near a corner: the layout-only rater prefers the centred one."""
    captions, images = [], []
    for i, prompt in enumerate(all_prompts()[::4]):
        off = Scene(prompt, 10.0, 21.0, 7.5)
        centred = Scene(prompt, 16.0, 16.0, 7.5)
        captions.append(prompt.caption)
        images.append(np.stack([render(off), render(centred)] if i % 2 else [render(centred), render(off)]))
    data = label_pairs(captions, np.stack(images), RaterWeights(aesthetic=0.0, layout=1.0, alignment=0.0), rng=None)
    winner = np.array([1 if i % 2 else 0 for i in range(len(captions))])
    assert (data.labels.argmax(1) == winner).all()
    assert np.allclose(data.subject[:, 0], data.subject[:, 1], atol=2 / 1024)
    assert (data.centring.max(1) > data.centring.min(1) + 5).all()


def test_parquet_round_trip_through_the_train_spm_reader(tmp_path):
    from spotune.data.pickapic import PickAPicPairs

    captions, images = _pairs(12, 4)
    data = label_pairs(captions, images, RaterWeights(), rng=random.Random(0))
    path = data.write(tmp_path / "pairs.parquet")
    pairs = PickAPicPairs(path, resolution=32)
    assert len(pairs) == 12 and pairs.captions == captions
    assert np.array_equal(pairs.labels, data.labels)
    for i in (0, 7):
        image_0, image_1 = pairs.images(i)
        assert np.array_equal(np.asarray(image_0), images[i, 0])  # PNG: lossless, the metrics still hold
        assert np.array_equal(np.asarray(image_1), images[i, 1])
    item = pairs[3]
    assert item["pixel_values_0"].shape == (3, 32, 32)


def test_label_pairs_rejects_mismatched_inputs():
    captions, images = _pairs(3, 5)
    with pytest.raises(ValueError):
        label_pairs(captions[:2], images, RaterWeights(), rng=None)
