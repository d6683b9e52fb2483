"""Exact, pixel-level measurements of the miniature world: alignment with the caption, and aesthetics.

Both are computed from a 32x32 RGB image alone, with no learned model, so anyone can check them.

*Reading a scene* (:func:`read_scene`):

1. the background colour is the per-channel median of the outermost ring of pixels (124 pixels; the
   shape never reaches it in the pre-training data, and clutter covers a small share of it);
2. the *object* is the largest 4-connected region of pixels farther than ``MASK_DISTANCE`` (unit RGB,
   Euclidean) from that background colour;
3. its shape is the template (circle, square, triangle, cross, drawn by the renderer's own geometry)
   with the highest intersection-over-union, each template placed at the object's centroid and
   scaled to its area;
4. its colour is the mean of the object's interior (the object eroded by one pixel, to skip
   anti-aliased edges), and both colours are named by the nearest palette colour.

*Alignment* (:func:`alignment`) is whether the three things the caption names are right: the shape,
the shape's colour, and the background colour. Nothing else of the image enters it.

*Aesthetics* (:func:`cleanliness`): a clean background. The background region is everything outside
the object grown by two pixels; each of its pixels contributes its distance from the background
colour, saturated at ``MASK_DISTANCE``, so a speck of clutter counts fully and faint blotches count
partly::

    cleanliness = 1 - mean over background pixels of min(1, |pixel - background colour| / MASK_DISTANCE)

A clean render scores exactly 1.0, and a render with clutter loses the clutter's share of the
background. The score does not look at the object, so it is independent of the alignment checks
(the tests check both ways on rendered ground truth).

*Subject size* (:attr:`SceneReading.object_fraction`, the object's share of the image) is a layout
property: the generic preference labels weigh it as raters weigh composition, the metrics above do not.
*Subject position* (:attr:`SceneReading.centroid`, the object's centroid in pixels) is the other layout
property; the evaluation's layout drift compares both between same-seed images of two models.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from spotune.toyworld.render import SUPERSAMPLE, shape_coverage, _subpixel_grid
from spotune.toyworld.world import COLOURS, IMAGE_SIZE, PALETTE, SHAPES, Prompt, parse_caption

MASK_DISTANCE = 0.3  # unit RGB; the closest two palette colours are 0.62 apart
BORDER_WIDTH = 1
BACKGROUND_MARGIN = 2

_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32) / 255.0  # [C, 3]


@dataclass(frozen=True)
class SceneReading:
    """What :func:`read_scene` found in an image.

    Attributes:
        shape: the best-matching shape, or ``None`` when no object stands out from the background.
        shape_iou: that template's intersection-over-union with the object (0 when no object).
        colour: the named colour nearest the object's interior (``None`` when no object).
        background: the named colour nearest the border's median.
        object_fraction: the object's share of the image's pixels.
        centroid: (x, y) of the object's centroid in pixels, measured from the image's top-left corner
            to pixel centres ((0.5, 0.5) is the first pixel's centre); ``None`` when no object.
        cleanliness: the aesthetic score in [0, 1] (see the module docstring).
    """

    shape: str | None
    shape_iou: float
    colour: str | None
    background: str
    object_fraction: float
    cleanliness: float
    centroid: tuple[float, float] | None = None


def nearest_colour(rgb: np.ndarray) -> str:
    """Name of the palette colour nearest ``rgb`` ([3] in unit range)."""
    return COLOURS[int(np.argmin(((_PALETTE_ARRAY - rgb[None]) ** 2).sum(-1)))]


def _border(image: np.ndarray, width: int = BORDER_WIDTH) -> np.ndarray:
    """[N, 3] pixels of the outer ring of ``width`` pixels."""
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = True, True, True, True
    return image[mask]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean [H, W] mask (an all-False mask if there is none)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        size, queue = 0, deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_size else np.zeros_like(mask)


def _shift_or(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by a (2 radius + 1)^2 square."""
    out = mask.copy()
    padded = np.pad(mask, radius)
    h, w = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out |= padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
    return out


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    return ~_shift_or(~mask, radius)


@lru_cache(maxsize=None)
def _shape_moments(shape: str) -> tuple[float, float, float]:
    """(area / r^2, centroid dx / r, centroid dy / r) of a shape, measured on a fine grid."""
    coords = np.linspace(-1.2, 1.2, 961)
    xs, ys = np.meshgrid(coords, coords, indexing="xy")
    inside = shape_coverage(shape, xs, ys, 1.0)
    cell = (coords[1] - coords[0]) ** 2
    return float(inside.sum() * cell), float(xs[inside].mean()), float(ys[inside].mean())


def _template(shape: str, centroid: tuple[float, float], area: float, size: int) -> np.ndarray:
    """Boolean [size, size] mask of ``shape`` whose centroid and area match the given ones."""
    unit_area, ox, oy = _shape_moments(shape)
    r = float(np.sqrt(area / unit_area))
    xs, ys = _subpixel_grid(size, SUPERSAMPLE)
    cx, cy = centroid[0] - ox * r, centroid[1] - oy * r
    cover = shape_coverage(shape, xs - cx, ys - cy, r).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    return cover >= 0.5


def classify_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """(best shape, its IoU) for a boolean object mask; (None, 0.0) for an empty one."""
    area = float(mask.sum())
    if area == 0:
        return None, 0.0
    ys, xs = np.nonzero(mask)
    centroid = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)  # pixel centres
    best, best_iou = None, -1.0
    for shape in SHAPES:
        template = _template(shape, centroid, area, mask.shape[0])
        union = float((template | mask).sum())
        iou = float((template & mask).sum()) / union if union else 0.0
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def read_scene(image: np.ndarray) -> SceneReading:
    """Measure one image (see the module docstring).

    Args:
        image: [H, W, 3] uint8 RGB.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 image, got {image.shape} {image.dtype}")
    pixels = image.astype(np.float32) / 255.0
    bg_rgb = np.median(_border(pixels), axis=0)  # [3]
    distance = np.sqrt(((pixels - bg_rgb) ** 2).sum(-1))  # [H, W]
    obj = largest_component(distance > MASK_DISTANCE)
    shape, iou = classify_shape(obj)
    colour = None
    if obj.any():
        interior = _erode(obj, 1)
        region = interior if interior.any() else obj
        colour = nearest_colour(pixels[region].mean(0))
    background_region = ~_shift_or(obj, BACKGROUND_MARGIN) if obj.any() else np.ones_like(obj)
    if background_region.any():
        clutter = np.minimum(1.0, distance[background_region] / MASK_DISTANCE)
        cleanliness = float(1.0 - clutter.mean())
    else:
        cleanliness = 0.0  # nothing but object: no background to be clean
    centroid = None
    if obj.any():
        ys, xs = np.nonzero(obj)
        centroid = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
    return SceneReading(
        shape=shape,
        shape_iou=iou,
        colour=colour,
        background=nearest_colour(bg_rgb),
        object_fraction=float(obj.mean()),
        cleanliness=cleanliness,
        centroid=centroid,
    )


def cleanliness(image: np.ndarray) -> float:
    """The aesthetic score of one [H, W, 3] uint8 image: how clean its background is, in [0, 1]."""
    return read_scene(image).cleanliness


@dataclass(frozen=True)
class AlignmentResult:
    """Which of the caption's three named things an image gets right."""

    shape: bool
    colour: bool
    background: bool

    @property
    def aligned(self) -> bool:
        return self.shape and self.colour and self.background


def alignment(reading: SceneReading, prompt: Prompt | str) -> AlignmentResult:
    """Compare a :class:`SceneReading` with what the caption names."""
    if isinstance(prompt, str):
        prompt = parse_caption(prompt)
    return AlignmentResult(
        shape=reading.shape == prompt.shape,
        colour=reading.colour == prompt.colour,
        background=reading.background == prompt.background,
    )


@dataclass(frozen=True)
class ImageScores:
    """Per-image measurements of a batch, as float arrays of length B."""

    cleanliness: np.ndarray
    aligned: np.ndarray
    shape_ok: np.ndarray
    colour_ok: np.ndarray
    background_ok: np.ndarray
    object_fraction: np.ndarray
    centroid_x: np.ndarray  # pixels; NaN where no object was found
    centroid_y: np.ndarray


def score_images(images: np.ndarray, captions: list[str]) -> ImageScores:
    """Measure a batch: [B, H, W, 3] uint8 images and their B captions."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    rows = []
    for image, caption in zip(images, captions):
        reading = read_scene(image)
        result = alignment(reading, caption)
        cx, cy = reading.centroid if reading.centroid is not None else (np.nan, np.nan)
        rows.append((reading.cleanliness, result.aligned, result.shape, result.colour, result.background,
                     reading.object_fraction, cx, cy))
    cols = np.array(rows, dtype=np.float64).reshape(len(rows), 8).T
    return ImageScores(*cols)


assert IMAGE_SIZE == 32  # the border width and margins above are chosen for 32-pixel scenes
