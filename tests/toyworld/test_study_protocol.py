"""The study's protocol pieces: the three caption splits and the layout drift on rendered ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spotune.toyworld.evaluate import layout_drift
from spotune.toyworld.metrics import read_scene, score_images
from spotune.toyworld.render import Scene, render
from spotune.toyworld.world import SHAPES, Prompt, all_prompts, prompt_split, prompt_splits


def test_the_three_splits_are_disjoint_cover_every_prompt_and_keep_the_train_split():
    splits = prompt_splits()
    train, validation, test = (set(s) for s in splits)
    assert not (train & validation) and not (train & test) and not (validation & test)
    assert train | validation | test == set(all_prompts())
    assert splits.train == prompt_split()[0]  # the shipped SPM and PickScore were trained on these prompts' data
    assert set(splits.validation) | set(splits.test) == set(prompt_split()[1])
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (96, 12, 12)
    for split in (splits.validation, splits.test):
        assert {p.shape for p in split} == set(SHAPES)  # every shape on both sides


def test_the_splits_are_stable_and_the_seed_changes_only_the_held_out_division():
    assert prompt_splits() == prompt_splits()
    # Written down so that a change of the division (which would invalidate recorded studies) is noticed.
    assert [p.caption for p in prompt_splits().test[:3]] == [
        "a red circle on a black background", "a yellow circle on a white background", "a blue circle on a red background"]
    other = prompt_splits(seed=1)
    assert other.train == prompt_splits().train and other.validation != prompt_splits().validation
    with pytest.raises(ValueError, match="validation_fraction"):
        prompt_splits(validation_fraction=1.0)


def _square(cx: float, cy: float, half_side: float) -> np.ndarray:
    """A square whose edges lie on pixel boundaries (integer centre and half-side): no anti-aliased edge."""
    return render(Scene(Prompt("square", "red", "blue"), cx=cx, cy=cy, radius=half_side / 0.82))


def test_reading_gives_the_subjects_centroid_on_a_pixel_aligned_render():
    reading = read_scene(_square(16.0, 12.0, 6.0))
    assert reading.centroid == pytest.approx((16.0, 12.0), abs=1e-9)
    assert reading.object_fraction == pytest.approx(12 * 12 / 1024, abs=1e-12)


def test_layout_drift_is_zero_for_identical_images_and_exact_for_a_moved_or_resized_subject():
    captions = ["a red square on a blue background"] * 3
    base = score_images(np.stack([_square(16.0, 16.0, 6.0)] * 3), captions)
    same = layout_drift(base, base)
    assert same.size.tolist() == [0.0, 0.0, 0.0] and same.position.tolist() == [0.0, 0.0, 0.0]
    model = score_images(np.stack([_square(16.0, 16.0, 6.0), _square(19.0, 12.0, 6.0), _square(16.0, 16.0, 4.0)]), captions)
    drift = layout_drift(model, base)
    np.testing.assert_allclose(drift.size, [0.0, 0.0, (144 - 64) / 1024], atol=1e-12)  # only the resized one grows/shrinks
    np.testing.assert_allclose(drift.position, [0.0, 5.0, 0.0], atol=1e-9)  # moved by (3, -4): 5 pixels
    summary = drift.summary()
    assert summary["layout_drift_position_px"] == pytest.approx(5.0 / 3)
    assert summary["layout_drift_size"] == pytest.approx(80 / 1024 / 3)
    low, high = summary["layout_drift_position_px_ci"]
    assert low <= 5.0 / 3 <= high and summary["layout_drift_position_pairs"] == 3


def test_an_image_without_a_subject_is_left_out_of_the_position_drift_only():
    captions = ["a red square on a blue background"] * 2
    blank = render(Scene(Prompt("square", "red", "blue"), radius=0.0))
    base = score_images(np.stack([_square(16.0, 16.0, 6.0)] * 2), captions)
    model = score_images(np.stack([blank, _square(18.0, 16.0, 6.0)]), captions)
    drift = layout_drift(model, base)
    np.testing.assert_allclose(drift.size, [144 / 1024, 0.0], atol=1e-12)
    np.testing.assert_allclose(drift.position, [2.0], atol=1e-9)


def test_drift_without_any_subject_pair_is_null_in_the_report_not_nan():
    captions = ["a red square on a blue background"]
    blank = render(Scene(Prompt("square", "red", "blue"), radius=0.0))
    base = score_images(np.stack([_square(16.0, 16.0, 6.0)]), captions)
    model = score_images(np.stack([blank]), captions)
    summary = layout_drift(model, base).summary()
    assert summary["layout_drift_position_pairs"] == 0
    assert summary["layout_drift_position_px"] is None and summary["layout_drift_position_px_ci"] == [None, None]
    json.dumps(summary, allow_nan=False)  # strict JSON
