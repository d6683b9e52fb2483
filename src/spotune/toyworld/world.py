"""The miniature world's vocabulary: shapes, named colours, captions, and the train / held-out split.

A scene is one shape of a named colour on a background of another named colour, described by a
caption such as ``"a red circle on a blue background"``. The caption names exactly three things
(shape, foreground colour, background colour); everything else about a scene (size, position,
clutter) is left to the image and is what the preference labels and the aesthetic metric look at.

Every prompt of the world is in :func:`all_prompts`; :func:`prompt_split` divides them, with a fixed
seed, into the prompts that preference data and SPO training may use and the held-out prompts the
demo evaluates on. :func:`prompt_splits` divides the held-out prompts once more, with another fixed
seed, into a validation split (where a study chooses its settings) and a test split (reported only),
for the multi-seed study (``bench/study_world.py``); the train split is the same in both. The base model is pre-trained on all of them, as Stable Diffusion saw its whole
caption distribution before anyone fine-tuned it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import NamedTuple

IMAGE_SIZE = 32

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# Named colours, far apart in RGB (every pair differs by more than 150 of 255 in Euclidean
# distance), so the nearest-colour check of the alignment metric cannot confuse two of them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (240, 220, 50),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)

HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 1234
VALIDATION_FRACTION = 0.5  # of the held-out prompts: 12 validation and 12 test of the 24
VALIDATION_SEED = 4321

_CAPTION = re.compile(r"^an? (\w+) (\w+) on an? (\w+) background$")


class CaptionError(ValueError):
    """A caption that does not describe a scene of this world."""


@dataclass(frozen=True)
class Prompt:
    """What a caption names: the shape, its colour and the background colour."""

    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def parse_caption(caption: str) -> Prompt:
    """``"a red circle on a blue background"`` -> ``Prompt("circle", "red", "blue")``.

    Raises:
        CaptionError: the caption is not of that form or names an unknown shape or colour.
    """
    match = _CAPTION.match(caption.strip().lower())
    if not match:
        raise CaptionError(f"caption {caption!r} is not of the form 'a <colour> <shape> on a <colour> background'")
    colour, shape, background = match.groups()
    if shape not in SHAPES:
        raise CaptionError(f"caption {caption!r}: unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    for name in (colour, background):
        if name not in PALETTE:
            raise CaptionError(f"caption {caption!r}: unknown colour {name!r} (known: {', '.join(COLOURS)})")
    if colour == background:
        raise CaptionError(f"caption {caption!r}: the shape and the background have the same colour")
    return Prompt(shape, colour, background)


def all_prompts() -> list[Prompt]:
    """Every scene description of the world: shapes x colours x other colours (120), in a fixed order."""
    return [Prompt(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if c != b]


def prompt_split(held_out_fraction: float = HELD_OUT_FRACTION, seed: int = SPLIT_SEED) -> tuple[list[Prompt], list[Prompt]]:
    """Split :func:`all_prompts` into (train, held_out) with a fixed seed.

    Every shape keeps prompts on both sides, so the held-out set measures new colour combinations of
    known shapes rather than an unseen shape.
    """
    train: list[Prompt] = []
    held: list[Prompt] = []
    rng = random.Random(seed)
    for shape in SHAPES:
        group = [p for p in all_prompts() if p.shape == shape]
        rng.shuffle(group)
        n_held = round(len(group) * held_out_fraction)
        held += group[:n_held]
        train += group[n_held:]
    key = {p: i for i, p in enumerate(all_prompts())}
    return sorted(train, key=key.__getitem__), sorted(held, key=key.__getitem__)



class PromptSplits(NamedTuple):
    """The study's three disjoint caption splits (each in the order of :func:`all_prompts`)."""

    train: list[Prompt]  # SPO's prompts and the preference data's: prompt_split()'s train part
    validation: list[Prompt]  # where the learning rate and the number of iterations are chosen
    test: list[Prompt]  # reported only


def prompt_splits(validation_fraction: float = VALIDATION_FRACTION, seed: int = VALIDATION_SEED) -> PromptSplits:
    """Train / validation / test: :func:`prompt_split`'s train part, and its held-out part divided per shape.

    The train split is exactly :func:`prompt_split`'s, so the shipped preference models (trained on
    preference data of those prompts) stay valid. The held-out prompts of each shape (6 of them) are
    shuffled with ``seed`` and divided, ``round(6 * validation_fraction)`` to validation and the rest to
    test (3 and 3 by default: 12 validation and 12 test prompts), so both splits hold every shape.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction}")
    train, held = prompt_split()
    rng = random.Random(seed)
    validation: list[Prompt] = []
    test: list[Prompt] = []
    for shape in SHAPES:
        group = [p for p in held if p.shape == shape]
        rng.shuffle(group)
        n_val = round(len(group) * validation_fraction)
        validation += group[:n_val]
        test += group[n_val:]
    key = {p: i for i, p in enumerate(all_prompts())}
    return PromptSplits(train, sorted(validation, key=key.__getitem__), sorted(test, key=key.__getitem__))
