"""Rendering scenes of the miniature world into 32x32 RGB images, anti-aliased by supersampling.

A :class:`Scene` is a :class:`~spotune.toyworld.world.Prompt` plus what the caption leaves open: the
shape's centre and size (the layout) and three aesthetic attributes at three spatial scales, as
photographs have them:

* *lighting* (coarse, the whole backdrop): the background is shaded toward mid-grey by a shade field
  ``s(x, y)`` in [0, ``MAX_SHADE``]. Even lighting is a plane (a flat or smoothly graded backdrop);
  blotchy lighting adds Gaussian blotches a few pixels wide on top of it;
* *vividness* (medium, the subject): the subject's fill is its named colour muted toward mid-grey by
  ``mute`` in [0, ``MAX_MUTE``] (a washed-out, low-contrast subject);
* *clutter* (fine, a few pixels): small specks of other named colours scattered on the background.

Shading and muting both move colours toward the same mid-grey, by bounded amounts, so the background
and the subject keep their named colours (the nearest palette colour never changes, and both stay far
apart from each other): the aesthetic never decides alignment. :func:`sample_scene` draws scenes from
the pre-training distribution, where each attribute is degraded in half of the scenes, independently,
so the base model produces good and bad renderings of each and there is something to prefer.
:func:`render` is deterministic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from spotune.toyworld.world import COLOURS, IMAGE_SIZE, PALETTE, Prompt

SUPERSAMPLE = 4
# Scene distribution of the pre-training data (pixels; the image centre is at 16.0).
CENTRE_JITTER = 4.0
RADIUS_RANGE = (6.5, 10.0)
MAX_SPECKS = 3
SPECK_SIZES = (3, 4)
GREY = (128, 128, 128)  # what shading and muting move colours toward
MAX_SHADE = 0.25  # the shade field's range is [0, MAX_SHADE] (share of the way to GREY)
MAX_MUTE = 0.35  # the most a subject is muted toward GREY; its named colour stays the nearest
DEGRADE_PROBABILITY = 0.5  # each aesthetic attribute is degraded in this share of pre-training scenes
MUTE_RANGE = (0.1, MAX_MUTE)
BLOTCH_COUNT = (1, 3)
BLOTCH_AMPLITUDE = (0.1, 0.22)
BLOTCH_SIGMA = (2.5, 5.0)  # pixels: several latent cells wide, far smaller than the image
EVEN_LEVEL_MAX = 0.12


@dataclass(frozen=True)
class Speck:
    """A square of clutter: top-left pixel (x, y), side ``size`` pixels, a named colour."""

    x: int
    y: int
    size: int
    colour: str


@dataclass(frozen=True)
class Blotch:
    """A Gaussian blotch of the shade field: centre (x, y) in pixels, width ``sigma`` pixels, peak ``amplitude``."""

    x: float
    y: float
    sigma: float
    amplitude: float


@dataclass(frozen=True)
class Scene:
    """Everything that decides an image.

    Attributes:
        prompt: shape, colour and background named by the caption.
        cx, cy, radius: the layout (pixels).
        specks: the clutter.
        shade: the even part of the lighting, ``(level, slope_x, slope_y)``: the shade field is
            ``level + slope_x * u + slope_y * v`` with ``u, v`` in [-1, 1] across the image.
        blotches: the blotchy part of the lighting, added to the even part.
        mute: how far the subject's fill is muted toward mid-grey (0 = its pure named colour).
    """

    prompt: Prompt
    cx: float = IMAGE_SIZE / 2
    cy: float = IMAGE_SIZE / 2
    radius: float = 8.0
    specks: tuple[Speck, ...] = field(default_factory=tuple)
    shade: tuple[float, float, float] = (0.0, 0.0, 0.0)
    blotches: tuple[Blotch, ...] = field(default_factory=tuple)
    mute: float = 0.0


def shade_field(scene: Scene, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The lighting's shade at pixel coordinates (xs, ys), clipped to [0, MAX_SHADE] (same shape as xs)."""
    level, gx, gy = scene.shade
    half = IMAGE_SIZE / 2
    field_ = level + gx * (xs - half) / half + gy * (ys - half) / half
    for b in scene.blotches:
        field_ = field_ + b.amplitude * np.exp(-((xs - b.x) ** 2 + (ys - b.y) ** 2) / (2 * b.sigma**2))
    return np.clip(field_, 0.0, MAX_SHADE)


def muted_colour(colour: str, mute: float) -> np.ndarray:
    """[3] float RGB (0-255) of a named colour muted ``mute`` of the way toward mid-grey."""
    rgb = np.asarray(PALETTE[colour], dtype=np.float32)
    return rgb + mute * (np.asarray(GREY, dtype=np.float32) - rgb)


def shape_coverage(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean inside-test of ``shape`` at offsets (dx, dy) from its centre (any array shape).

    The shapes are sized so that ``radius`` is about their half-extent: a disc; a square of half-side
    0.82 r; an upward triangle with apex 1.05 r above the centre and base 0.8 r below it; a plus-shaped
    cross with arms r long and 0.38 r half-wide.
    """
    r = radius
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if shape == "triangle":
        top, bottom, half_width = -1.05 * r, 0.8 * r, 1.05 * r
        frac = (dy - top) / (bottom - top)  # 0 at the apex, 1 at the base
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width * frac)
    if shape == "cross":
        arm, half = r, 0.38 * r
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= arm) & (ay <= half)) | ((ay <= arm) & (ax <= half))
    raise ValueError(f"unknown shape {shape!r}")


def _subpixel_grid(size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel centre coordinates [size*ss, size*ss] in pixel units (pixel i spans [i, i+1])."""
    coords = (np.arange(size * supersample) + 0.5) / supersample
    return np.meshgrid(coords, coords, indexing="xy")


def render(scene: Scene, size: int = IMAGE_SIZE, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Draw ``scene``: the lit background, clutter specks, then the shape (anti-aliased edges).

    Returns:
        [size, size, 3] uint8 RGB.
    """
    ss = supersample
    xs, ys = _subpixel_grid(size, ss)
    background = np.asarray(PALETTE[scene.prompt.background], dtype=np.float32)
    shade = shade_field(scene, xs, ys)[..., None]  # [size*ss, size*ss, 1]
    canvas = background + shade * (np.asarray(GREY, dtype=np.float32) - background)
    for speck in scene.specks:
        canvas[speck.y * ss : (speck.y + speck.size) * ss, speck.x * ss : (speck.x + speck.size) * ss] = PALETTE[speck.colour]
    inside = shape_coverage(scene.prompt.shape, xs - scene.cx, ys - scene.cy, scene.radius)
    canvas[inside] = muted_colour(scene.prompt.colour, scene.mute)
    image = canvas.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _shape_box(cx: float, cy: float, radius: float, margin: float) -> tuple[float, float, float, float]:
    extent = 1.05 * radius + margin
    return cx - extent, cy - extent, cx + extent, cy + extent


def even_shade(rng: random.Random) -> tuple[float, float, float]:
    """A random plane of shade that stays inside [0, MAX_SHADE] over the whole image."""
    level = rng.uniform(0.0, EVEN_LEVEL_MAX)
    budget = rng.uniform(0.0, min(level, MAX_SHADE - level))  # |slope_x| + |slope_y| <= budget
    share = rng.uniform(0.0, 1.0)
    return (level, budget * share * rng.choice((-1, 1)), budget * (1 - share) * rng.choice((-1, 1)))


def random_blotches(rng: random.Random) -> tuple[Blotch, ...]:
    """1-3 blotches anywhere in the image (the marks of harsh, uneven lighting)."""
    return tuple(
        Blotch(rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE), rng.uniform(*BLOTCH_SIGMA), rng.uniform(*BLOTCH_AMPLITUDE))
        for _ in range(rng.randint(*BLOTCH_COUNT))
    )


def sample_scene(prompt: Prompt, rng: random.Random, num_specks: int | None = None, *,
                 blotchy: bool | None = None, mute: float | None = None) -> Scene:
    """Draw a scene for ``prompt`` from the pre-training distribution.

    The centre is jittered by up to ``CENTRE_JITTER`` pixels and the radius is uniform in
    ``RADIUS_RANGE``. Each aesthetic attribute is degraded with probability ``DEGRADE_PROBABILITY``,
    independently: clutter (1-3 specks, uniformly many, of colours other than the background's, placed
    where they do not touch the shape; otherwise none), lighting (blotches on the even shade plane;
    otherwise the plane alone) and vividness (``mute`` uniform in ``MUTE_RANGE``; otherwise 0).
    ``num_specks``, ``blotchy`` and ``mute`` fix an attribute instead of drawing it.
    """
    cx = IMAGE_SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)
    cy = IMAGE_SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)
    radius = rng.uniform(*RADIUS_RANGE)
    if num_specks is None:
        num_specks = rng.randint(1, MAX_SPECKS) if rng.random() < DEGRADE_PROBABILITY else 0
    n = num_specks
    shade = even_shade(rng)
    if blotchy is None:
        blotchy = rng.random() < DEGRADE_PROBABILITY
    blotches = random_blotches(rng) if blotchy else ()
    if mute is None:
        mute = rng.uniform(*MUTE_RANGE) if rng.random() < DEGRADE_PROBABILITY else 0.0
    x0, y0, x1, y1 = _shape_box(cx, cy, radius, margin=2.0)
    colours = [c for c in COLOURS if c != prompt.background]
    specks: list[Speck] = []
    for _ in range(200):  # rejection sampling; the free area is large, so this ends quickly
        if len(specks) == n:
            break
        side = rng.choice(SPECK_SIZES)
        x, y = rng.randint(0, IMAGE_SIZE - side), rng.randint(0, IMAGE_SIZE - side)
        if x + side > x0 and x < x1 and y + side > y0 and y < y1:
            continue  # would touch the shape
        if any(x + side + 1 > s.x and x < s.x + s.size + 1 and y + side + 1 > s.y and y < s.y + s.size + 1 for s in specks):
            continue  # keep specks apart, so each stays a speck
        specks.append(Speck(x, y, side, rng.choice(colours)))
    return Scene(prompt, cx, cy, radius, tuple(specks), shade, blotches, float(mute))


def to_tensor(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float32 in [-1, 1] (the diffusion models' pixel range)."""
    array = np.stack(images) if isinstance(images, list) else images
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in about [-1, 1] -> [B, H, W, 3] uint8 (clamped, rounded), as a PNG would store it."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()
