"""The exact metrics on rendered ground truth: right on clean renders, and independent of each other."""

from __future__ import annotations

import random

import numpy as np
import pytest

from spotune.toyworld.metrics import CLUTTER_SCALE, alignment, cleanliness, read_scene, score_images
from spotune.toyworld.render import Scene, render, sample_scene
from spotune.toyworld.world import COLOURS, PALETTE, SHAPES, Prompt, all_prompts


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(7)
    return [sample_scene(p, rng) for p in all_prompts()] + [sample_scene(p, rng) for p in all_prompts()[::3]]


def test_alignment_is_exact_on_every_rendered_scene_with_or_without_clutter(scenes):
    for scene in scenes:
        result = alignment(read_scene(render(scene)), scene.prompt)
        assert result.aligned, (scene, read_scene(render(scene)))


def test_alignment_names_the_wrong_part_of_a_wrong_caption():
    image = render(Scene(Prompt("triangle", "green", "white")))
    reading = read_scene(image)
    assert alignment(reading, "a green triangle on a white background").aligned
    wrong_shape = alignment(reading, "a green circle on a white background")
    assert (wrong_shape.shape, wrong_shape.colour, wrong_shape.background) == (False, True, True)
    wrong_colour = alignment(reading, "a red triangle on a white background")
    assert (wrong_colour.shape, wrong_colour.colour, wrong_colour.background) == (True, False, True)
    wrong_bg = alignment(reading, "a green triangle on a black background")
    assert (wrong_bg.shape, wrong_bg.colour, wrong_bg.background) == (True, True, False)


def test_cleanliness_is_one_on_every_clean_render_whatever_shape_colour_size_or_position():
    rng = random.Random(3)
    for prompt in all_prompts():
        scene = sample_scene(prompt, rng, num_specks=0, blotchy=False, mute=0.0)
        assert cleanliness(render(scene)) == pytest.approx(1.0)


def test_cleanliness_falls_with_clutter_by_its_share_of_the_background():
    rng = random.Random(4)
    for prompt in all_prompts()[::5]:
        full = sample_scene(prompt, rng, num_specks=3)
        values = [cleanliness(render(Scene(prompt, full.cx, full.cy, full.radius, full.specks[:n]))) for n in range(4)]
        assert values[0] == pytest.approx(1.0)
        assert values[0] > values[1] > values[2] > values[3]
        reading = read_scene(render(Scene(prompt, full.cx, full.cy, full.radius)))
        # Each speck costs at most its area over the background area (saturated distance = 1 per pixel),
        # on the scale where clutter over CLUTTER_SCALE of the backdrop scores 0.
        speck_area = sum(s.size**2 for s in full.specks)
        assert 1 - values[3] <= min(1.0, speck_area / (1024 * (1 - reading.object_fraction) * 0.7) / CLUTTER_SCALE)


def test_clutter_does_not_change_what_alignment_reads(scenes):
    for scene in scenes[:60]:
        clean = read_scene(render(Scene(scene.prompt, scene.cx, scene.cy, scene.radius)))
        cluttered = read_scene(render(scene))
        assert (clean.shape, clean.colour, clean.background) == (cluttered.shape, cluttered.colour, cluttered.background)


def test_a_blank_image_has_no_object_and_is_not_aligned():
    blank = np.full((32, 32, 3), PALETTE["blue"], dtype=np.uint8)
    reading = read_scene(blank)
    assert reading.shape is None and reading.colour is None and reading.background == "blue"
    assert reading.cleanliness == pytest.approx(1.0)
    assert not alignment(reading, "a red circle on a blue background").aligned


def test_shape_classifier_separates_all_shapes_at_every_size():
    for shape in SHAPES:
        for radius in (6.5, 8.0, 10.0):
            reading = read_scene(render(Scene(Prompt(shape, "black", "white"), 15.3, 16.7, radius)))
            assert reading.shape == shape and reading.shape_iou > 0.8


def test_score_images_batches_and_checks_lengths():
    images = np.stack([render(Scene(Prompt("circle", c, "black" if c != "black" else "white"))) for c in COLOURS])
    captions = [f"a {c} circle on a {'black' if c != 'black' else 'white'} background" for c in COLOURS]
    scores = score_images(images, captions)
    assert scores.aligned.tolist() == [1.0] * len(COLOURS)
    assert scores.cleanliness.tolist() == pytest.approx([1.0] * len(COLOURS))
    with pytest.raises(ValueError):
        score_images(images, captions[:-1])
