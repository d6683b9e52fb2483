"""Rendering scenes of the miniature world into 32x32 RGB images, anti-aliased by supersampling.

A :class:`Scene` is a :class:`~spotune.toyworld.world.Prompt` plus what the caption leaves open:
the shape's centre and size, and *clutter*, small specks of other named colours scattered on the
background. :func:`sample_scene` draws those from the distribution the base model is pre-trained on
(clutter is as common as a clean background there, so the base model produces both and there is
room to prefer one). :func:`render` is deterministic.
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


@dataclass(frozen=True)
class Speck:
    """A square of clutter: top-left pixel (x, y), side ``size`` pixels, a named colour."""

    x: int
    y: int
    size: int
    colour: str


@dataclass(frozen=True)
class Scene:
    """Everything that decides an image: the prompt, the shape's centre (cx, cy) and radius, the clutter."""

    prompt: Prompt
    cx: float = IMAGE_SIZE / 2
    cy: float = IMAGE_SIZE / 2
    radius: float = 8.0
    specks: tuple[Speck, ...] = field(default_factory=tuple)


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
    """Draw ``scene``: background, clutter specks, then the shape (anti-aliased edges).

    Returns:
        [size, size, 3] uint8 RGB.
    """
    ss = supersample
    canvas = np.empty((size * ss, size * ss, 3), dtype=np.float32)
    canvas[:] = PALETTE[scene.prompt.background]
    for speck in scene.specks:
        canvas[speck.y * ss : (speck.y + speck.size) * ss, speck.x * ss : (speck.x + speck.size) * ss] = PALETTE[speck.colour]
    xs, ys = _subpixel_grid(size, ss)
    inside = shape_coverage(scene.prompt.shape, xs - scene.cx, ys - scene.cy, scene.radius)
    canvas[inside] = PALETTE[scene.prompt.colour]
    image = canvas.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _shape_box(cx: float, cy: float, radius: float, margin: float) -> tuple[float, float, float, float]:
    extent = 1.05 * radius + margin
    return cx - extent, cy - extent, cx + extent, cy + extent


def sample_scene(prompt: Prompt, rng: random.Random, num_specks: int | None = None) -> Scene:
    """Draw a scene for ``prompt`` from the pre-training distribution.

    The centre is jittered by up to ``CENTRE_JITTER`` pixels, the radius is uniform in
    ``RADIUS_RANGE``, and 0-3 specks (uniformly many, unless ``num_specks`` is given) of colours other
    than the background's are placed where they do not touch the shape.
    """
    cx = IMAGE_SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)
    cy = IMAGE_SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)
    radius = rng.uniform(*RADIUS_RANGE)
    n = rng.randint(0, MAX_SPECKS) if num_specks is None else num_specks
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
    return Scene(prompt, cx, cy, radius, tuple(specks))


def to_tensor(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float32 in [-1, 1] (the diffusion models' pixel range)."""
    array = np.stack(images) if isinstance(images, list) else images
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in about [-1, 1] -> [B, H, W, 3] uint8 (clamped, rounded), as a PNG would store it."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()
