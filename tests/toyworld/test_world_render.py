"""The miniature world's vocabulary, split, renderer and tokenizer."""

from __future__ import annotations

import random

import numpy as np
import pytest

from spotune.toyworld.render import Scene, Speck, render, sample_scene, to_tensor, to_uint8
from spotune.toyworld.world import (
    COLOURS,
    PALETTE,
    SHAPES,
    CaptionError,
    Prompt,
    all_prompts,
    parse_caption,
    prompt_split,
)


def test_prompts_cover_every_combination_once():
    prompts = all_prompts()
    assert len(prompts) == len(SHAPES) * len(COLOURS) * (len(COLOURS) - 1)
    assert len(set(prompts)) == len(prompts)
    assert all(p.colour != p.background for p in prompts)


def test_caption_round_trip_and_errors():
    for p in all_prompts():
        assert parse_caption(p.caption) == p
    assert parse_caption("A Red circle on a blue background") == Prompt("circle", "red", "blue")
    for bad in ("a red hexagon on a blue background", "a pink circle on a blue background",
                "a red circle on a red background", "red circle, blue background"):
        with pytest.raises(CaptionError):
            parse_caption(bad)


def test_split_is_fixed_disjoint_and_keeps_every_shape_on_both_sides():
    train, held = prompt_split()
    assert prompt_split() == (train, held)
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(all_prompts())
    assert len(held) == round(0.2 * len(all_prompts()))
    for shape in SHAPES:
        assert any(p.shape == shape for p in train) and any(p.shape == shape for p in held)


def test_render_is_deterministic_and_paints_what_the_scene_says():
    scene = Scene(Prompt("square", "red", "blue"), cx=16, cy=16, radius=8, specks=(Speck(1, 1, 3, "yellow"),))
    image = render(scene)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert np.array_equal(image, render(scene))
    assert tuple(image[16, 16]) == PALETTE["red"]
    assert tuple(image[30, 30]) == PALETTE["blue"]
    assert tuple(image[2, 2]) == PALETTE["yellow"]


def test_sampled_specks_never_touch_the_shape_and_avoid_the_background_colour():
    rng = random.Random(0)
    for prompt in all_prompts()[::7]:
        scene = sample_scene(prompt, rng, num_specks=3)
        assert len(scene.specks) == 3
        for speck in scene.specks:
            assert speck.colour != prompt.background
            clean = render(Scene(prompt, scene.cx, scene.cy, scene.radius))
            patch = clean[speck.y : speck.y + speck.size, speck.x : speck.x + speck.size]
            assert (patch == PALETTE[prompt.background]).all()


def test_tensor_conversions_round_trip():
    image = render(sample_scene(all_prompts()[5], random.Random(1)))
    assert np.array_equal(to_uint8(to_tensor([image]))[0], image)


def test_tokenizer_spells_every_word_as_one_token_and_emits_eos(tmp_path):
    from spotune.toyworld import components as C

    tok = C.build_tokenizer(tmp_path)
    for word in C.WORDS:
        assert len(tok(word).input_ids) == 3, word  # bos, the word, eos
    ids = tok(all_prompts()[0].caption).input_ids
    assert ids[-1] == tok.eos_token_id < len(tok)
    assert C.text_config(tok).eos_token_id == tok.eos_token_id
    assert len(tok(all_prompts()[0].caption, padding="max_length").input_ids) == C.MAX_LENGTH
