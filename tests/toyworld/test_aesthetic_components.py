"""The three-scale aesthetic on rendered ground truth: 1.0 when clean, each degradation lowering only its
own component, and neither alignment nor layout moved by any of them."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from spotune.toyworld import metrics as M
from spotune.toyworld.render import (
    DEGRADE_PROBABILITY,
    GREY,
    MAX_MUTE,
    MAX_SHADE,
    Blotch,
    Scene,
    even_shade,
    render,
    sample_scene,
    shade_field,
)
from spotune.toyworld.world import COLOURS, IMAGE_SIZE, PALETTE, Prompt, all_prompts

COMPONENTS = ("lighting", "vividness", "cleanliness")


def components(scene: Scene) -> dict[str, float]:
    reading = M.read_scene(render(scene))
    return {name: getattr(reading, name) for name in COMPONENTS}


def clean(scene: Scene) -> Scene:
    return dataclasses.replace(scene, specks=(), blotches=(), mute=0.0)


@pytest.fixture(scope="module")
def clean_scenes() -> list[Scene]:
    """Every prompt twice, at random layouts and random even lighting, with nothing degraded."""
    rng = random.Random(11)
    return [clean(sample_scene(p, rng)) for p in all_prompts() for _ in range(2)]


def far_corner_blotch(scene: Scene, amplitude: float) -> Blotch:
    """A blotch centred in the image corner farthest from the subject (on the visible backdrop)."""
    x = 3.0 if scene.cx > IMAGE_SIZE / 2 else IMAGE_SIZE - 3.0
    y = 3.0 if scene.cy > IMAGE_SIZE / 2 else IMAGE_SIZE - 3.0
    return Blotch(x, y, 4.0, amplitude)


def test_every_clean_render_scores_exactly_one_on_every_component(clean_scenes):
    for scene in clean_scenes:
        reading = M.read_scene(render(scene))
        assert (reading.lighting, reading.vividness, reading.cleanliness) == (1.0, 1.0, 1.0), scene
        assert reading.aesthetic == 1.0


def test_a_smooth_gradient_is_even_lighting_and_stays_in_range():
    rng = random.Random(2)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    for _ in range(200):
        shade = even_shade(rng)
        field = shade_field(Scene(Prompt("circle", "red", "blue"), shade=shade), xs, ys)
        level, gx, gy = shade
        assert field.min() >= 0.0 and field.max() <= MAX_SHADE
        assert np.allclose(field, level + gx * (xs - 16) / 16 + gy * (ys - 16) / 16)  # never clipped: a plane
    steep = Scene(Prompt("square", "black", "white"), 12.0, 20.0, 7.0, shade=(0.12, 0.07, -0.05))
    assert components(steep) == {"lighting": 1.0, "vividness": 1.0, "cleanliness": 1.0}


def degraded_series(scene: Scene, own: str, seed: int) -> list[Scene]:
    """Three ever stronger degradations of ``own`` on a clean scene."""
    if own == "lighting":
        return [dataclasses.replace(scene, blotches=(far_corner_blotch(scene, a),)) for a in (0.08, 0.14, 0.22)]
    if own == "vividness":
        return [dataclasses.replace(scene, mute=m) for m in (0.1, 0.2, 0.3)]
    # clutter: specks placed for this scene's layout, one more each time
    specks = sample_scene(scene.prompt, random.Random(seed), num_specks=3).specks
    placed = dataclasses.replace(sample_scene(scene.prompt, random.Random(seed), num_specks=3), shade=scene.shade,
                                 blotches=(), mute=0.0)
    return [dataclasses.replace(placed, specks=specks[: k + 1]) for k in range(3)]


@pytest.mark.parametrize("own", COMPONENTS)
def test_each_degradation_lowers_only_its_own_component_and_more_of_it_lowers_it_more(clean_scenes, own):
    for i, scene in enumerate(clean_scenes[::6]):
        values = []
        for degraded in degraded_series(scene, own, seed=i):
            got = components(degraded)
            assert all(got[name] == 1.0 for name in COMPONENTS if name != own), (own, got, degraded)
            values.append(got[own])
        assert 1.0 > values[0] > values[1] > values[2], (own, values, scene)


def test_no_degradation_moves_alignment_or_layout():
    rng = random.Random(9)
    for prompt in all_prompts():
        scene = sample_scene(prompt, rng, num_specks=3, blotchy=True, mute=MAX_MUTE)
        truth = M.read_scene(render(clean(scene)))
        degraded = M.read_scene(render(scene))
        assert M.alignment(degraded, prompt).aligned and M.alignment(truth, prompt).aligned, scene
        assert (degraded.shape, degraded.colour, degraded.background) == (truth.shape, truth.colour, truth.background)
        assert abs(degraded.object_fraction - truth.object_fraction) <= 2 / IMAGE_SIZE**2, scene
        assert np.hypot(degraded.centroid[0] - truth.centroid[0], degraded.centroid[1] - truth.centroid[1]) < 0.1, scene


def test_the_aesthetic_does_not_depend_on_what_the_caption_names_or_where_the_subject_is():
    """The same degradations on every shape, colour pair, size and position give about the same scores."""
    rng = random.Random(21)
    lighting, vividness = [], []
    for prompt in all_prompts():
        scene = sample_scene(prompt, rng, num_specks=0, blotchy=False, mute=0.2)
        scene = dataclasses.replace(scene, shade=(0.0, 0.0, 0.0), blotches=(far_corner_blotch(scene, 0.15),))
        got = components(scene)
        lighting.append(got["lighting"])
        vividness.append(got["vividness"])
    assert np.ptp(vividness) < 0.03  # 8-bit rounding only: muting is measured against each colour's own grey line
    assert 0.0 < min(lighting) and np.std(lighting) < 0.1


def test_palette_and_limits_keep_objects_clutter_and_lighting_apart():
    """The constants the metric's thresholds rest on: every colour far off every other colour's shading
    line, a subject muted by MAX_MUTE still nearest its own colour and still far off the backdrop's line."""
    grey = np.asarray(GREY, dtype=np.float64) / 255.0
    rgb = {c: np.asarray(PALETTE[c], dtype=np.float64) / 255.0 for c in COLOURS}
    for background in COLOURS:
        line = grey - rgb[background]
        for colour in COLOURS:
            if colour == background:
                continue
            muted = rgb[colour] + MAX_MUTE * (grey - rgb[colour])
            assert M.nearest_colour(muted.astype(np.float32)) == colour
            for pixel in (rgb[colour], muted):
                # the metric measures off the segment through the (shaded) median: the worst case is
                # any anchor on the backdrop's own line
                for anchor_shade in np.linspace(0.0, MAX_SHADE, 6):
                    anchor = rgb[background] + anchor_shade * line
                    d = M.off_line_distance(pixel[None, None].astype(np.float32), anchor.astype(np.float32), line.astype(np.float32))
                    assert float(d[0, 0]) > M.MASK_DISTANCE + 0.05, (colour, background, float(d[0, 0]))
        shaded = rgb[background] + MAX_SHADE * line
        assert M.nearest_colour(shaded.astype(np.float32)) == background


def test_pretraining_scenes_degrade_each_attribute_independently_in_about_half():
    rng = random.Random(0)
    scenes = [sample_scene(p, rng) for p in all_prompts() * 20]  # 2400
    flags = np.array([[bool(s.blotches), s.mute > 0, bool(s.specks)] for s in scenes], dtype=float)
    n = len(scenes)
    tolerance = 4 * np.sqrt(DEGRADE_PROBABILITY * (1 - DEGRADE_PROBABILITY) / n)
    assert np.all(np.abs(flags.mean(0) - DEGRADE_PROBABILITY) < tolerance)
    both = [(flags[:, i] * flags[:, j]).mean() for i in range(3) for j in range(i + 1, 3)]
    assert np.all(np.abs(np.array(both) - DEGRADE_PROBABILITY**2) < tolerance)
    assert all(0 < s.mute <= MAX_MUTE for s in scenes if s.mute)


def test_a_scene_without_backdrop_or_subject_scores_zero_where_nothing_can_be_judged():
    blank = np.full((32, 32, 3), PALETTE["blue"], dtype=np.uint8)
    reading = M.read_scene(blank)
    assert reading.shape is None and reading.vividness == 0.0
    assert reading.lighting == 1.0 and reading.cleanliness == 1.0
