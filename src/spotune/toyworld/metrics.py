"""Exact, pixel-level measurements of the miniature world: alignment with the caption, layout, and aesthetics.

All are computed from a 32x32 RGB image alone, with no learned model, so anyone can check them.

*Reading a scene* (:func:`read_scene`):

1. the background colour is the per-channel median of the outermost ring of pixels (124 pixels; the
   shape never reaches it in the pre-training data, and clutter covers a small share of it), named
   by the nearest palette colour. The renderer shades backgrounds toward mid-grey, so the background's
   pixels lie on the *shading line* through that median toward grey (``median + s (grey - named
   background)``, ``|s| <= MAX_SHADE``); a pixel's distance from that segment is its *off-line distance*;
2. the object's colour comes from the largest 4-connected region of pixels whose off-line distance
   exceeds ``MASK_DISTANCE`` (unit RGB): the mean of its interior (eroded by one pixel, to skip
   anti-aliased edges), named by the nearest palette colour;
3. the *object* is then that region's pixels (grown by one) whose colour lies at least
   ``EDGE_COVERAGE`` of the way from the local background (the mean background pixel of the 5x5
   neighbourhood) to the object's colour: the edge at a fixed coverage, whatever the subject's
   contrast or the lighting around it;
4. its shape is the template (circle, square, triangle, cross, drawn by the renderer's own geometry)
   with the highest intersection-over-union, each template placed at the object's centroid and
   scaled to its area.

*Alignment* (:func:`alignment`) is whether the three things the caption names are right: the shape,
the shape's colour, and the background colour. Nothing else of the image enters it.

*Layout* is the subject's size (:attr:`SceneReading.object_fraction`, its share of the image) and
position (:attr:`SceneReading.centroid`). The rater weighs size as raters weigh composition; the
evaluation's layout drift compares both between same-seed images of two models.

*Aesthetics* (:attr:`SceneReading.aesthetic`) is the mean of three components, one per spatial scale,
each in [0, 1] with 1 for a clean render (a dead zone absorbs the rounding of 8-bit pixels). The
*background region* is everything outside the object grown by ``BACKGROUND_MARGIN`` pixels.

* **lighting** (coarse): each background pixel that is not clutter (off-line distance under
  ``CLUTTER_ONSET``) gives its shade ``s``, its position along the shading line. A least-squares plane
  is fitted to ``s`` over those pixels; an even or smoothly graded backdrop is a plane, blotches are
  what the plane leaves::

      lighting = 1 - clip((rms residual of s - LIGHTING_DEAD) / LIGHTING_SCALE, 0, 1)

* **vividness** (medium): the subject's interior (the object eroded by one pixel), projected onto the
  line from mid-grey to its named colour; the median position ``m`` is 1 for a pure fill and
  ``1 - mute`` for one muted toward grey::

      vividness = 1 - clip((1 - m - VIVIDNESS_DEAD) / VIVIDNESS_SCALE, 0, 1)

* **cleanliness** (fine): clutter. Each background pixel counts its off-line distance, saturated at
  ``MASK_DISTANCE``, so a speck counts fully and faint marks partly, while lighting, which stays on the
  line, does not count::

      clutter = mean over background pixels of clip((off-line distance - CLUTTER_DEAD) / (MASK_DISTANCE - CLUTTER_DEAD), 0, 1)
      cleanliness = 1 - clip(clutter / CLUTTER_SCALE, 0, 1)

No component looks at which shape or which colours the image has, and each looks at its own part of
the image (the backdrop's smooth shading, the subject's interior, the backdrop's off-line marks), so
aesthetics are independent of alignment and layout, and each degradation of the renderer lowers only
its own component (the tests check all of this on rendered ground truth).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from spotune.toyworld.render import GREY, MAX_SHADE, SUPERSAMPLE, shape_coverage, _subpixel_grid
from spotune.toyworld.world import COLOURS, IMAGE_SIZE, PALETTE, SHAPES, Prompt, parse_caption

# Off-line distances are in unit RGB. The closest two palette colours are 0.62 apart; every palette
# colour is at least 0.40 off any other colour's shading line, and a subject muted by MAX_MUTE at least
# 0.32, wherever on the line the border's median lies (checked in the tests), while lit background lies
# on the line: MASK_DISTANCE separates objects and clutter from lighting with room for a model's errors.
MASK_DISTANCE = 0.25
CLUTTER_ONSET = 0.1  # background pixels farther off the line than this are left out of the lighting fit
CLUTTER_DEAD = 0.02  # off-line distance that 8-bit rounding can reach (about 0.0035) with room to spare
CLUTTER_SCALE = 0.08  # clutter covering 8% of the backdrop scores 0 (three specks of 4x4 cover about 7%)
LIGHTING_DEAD = 0.01  # rms shade residual of 8-bit rounding (at most about 0.005)
LIGHTING_SCALE = 0.05  # rms shade residual that scores 0: about two blotches of amplitude 0.2
VIVIDNESS_DEAD = 0.01
VIVIDNESS_SCALE = 0.35  # a subject muted by MAX_MUTE (0.35) scores about 0
MIN_LIGHTING_PIXELS = 16
BORDER_WIDTH = 1
BACKGROUND_MARGIN = 2
# The renderer's 4x supersampling puts axis-aligned edge pixels at coverages 0, 1/4, 1/2, 3/4, 1, and
# 8-bit rounding moves a measured coverage by under 0.02: a threshold between quanta is stable, and
# 0.4 counts half-covered pixels in, as the shape templates do.
EDGE_COVERAGE = 0.4
LOCAL_BACKGROUND = 2  # half-width of the neighbourhood that estimates the background next to an edge

AESTHETIC_COMPONENTS = ("lighting", "vividness", "cleanliness")  # coarse, medium, fine
_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32) / 255.0  # [C, 3]
_GREY = np.asarray(GREY, dtype=np.float32) / 255.0


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
        cleanliness: the fine aesthetic component, clutter (see the module docstring).
        lighting: the coarse component, evenness of the backdrop's lighting.
        vividness: the medium component, the subject's colour against a muted one (0 when no object).
    """

    shape: str | None
    shape_iou: float
    colour: str | None
    background: str
    object_fraction: float
    cleanliness: float
    centroid: tuple[float, float] | None = None
    lighting: float = 1.0
    vividness: float = 1.0

    @property
    def aesthetic(self) -> float:
        """The aesthetic score: the mean of lighting (coarse), vividness (medium) and cleanliness (fine)."""
        return (self.lighting + self.vividness + self.cleanliness) / 3.0


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


def _box_sum(values: np.ndarray, radius: int) -> np.ndarray:
    """Sum of ``values`` ([H, W] or [H, W, C]) over each pixel's (2 radius + 1)^2 neighbourhood (zero outside)."""
    h, w = values.shape[:2]
    padded = np.pad(values, [(radius, radius), (radius, radius)] + [(0, 0)] * (values.ndim - 2))
    out = np.zeros_like(values)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out += padded[dy : dy + h, dx : dx + w]
    return out


def off_line_distance(pixels: np.ndarray, anchor: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Distance of each pixel ([H, W, 3] unit RGB) from the segment ``anchor + s direction``, |s| <= MAX_SHADE."""
    s = np.clip(((pixels - anchor) @ direction) / float(direction @ direction), -MAX_SHADE, MAX_SHADE)
    return np.sqrt(((pixels - anchor - s[..., None] * direction) ** 2).sum(-1))


def _plane_residual_rms(values: np.ndarray, mask: np.ndarray) -> float:
    """RMS residual of a least-squares plane a + b x + c y fitted to ``values`` on ``mask`` ([H, W])."""
    ys, xs = np.nonzero(mask)
    design = np.stack([np.ones_like(xs), xs, ys], axis=1).astype(np.float64)
    target = values[mask].astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    return float(np.sqrt(np.mean((target - design @ coef) ** 2)))


def _score(excess: float, dead: float, scale: float) -> float:
    """1 - clip((excess - dead) / scale, 0, 1)."""
    return float(1.0 - np.clip((excess - dead) / scale, 0.0, 1.0))


def read_scene(image: np.ndarray) -> SceneReading:
    """Measure one image (see the module docstring).

    Args:
        image: [H, W, 3] uint8 RGB.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 image, got {image.shape} {image.dtype}")
    pixels = image.astype(np.float32) / 255.0
    bg_rgb = np.median(_border(pixels), axis=0)  # [3]
    background = nearest_colour(bg_rgb)
    shading = _GREY - np.asarray(PALETTE[background], dtype=np.float32) / 255.0  # [3]
    off_line = off_line_distance(pixels, bg_rgb, shading)  # [H, W]
    core = largest_component(off_line > MASK_DISTANCE)

    colour, obj = None, core
    if core.any():
        interior = _erode(core, 1)
        fill = pixels[interior if interior.any() else core].mean(0)  # [3]
        colour = nearest_colour(fill)
        # The edge at a fixed coverage (EDGE_COVERAGE) against the local background: contrast and lighting barely move it.
        around = ~_shift_or(core, 1) & (off_line <= CLUTTER_ONSET)
        weight = _box_sum(around.astype(np.float32), LOCAL_BACKGROUND)
        local = np.where(weight[..., None] > 0,
                         _box_sum(pixels * around[..., None], LOCAL_BACKGROUND) / np.maximum(weight, 1.0)[..., None],
                         bg_rgb)
        axis = fill - local  # [H, W, 3]
        coverage = ((pixels - local) * axis).sum(-1) / np.maximum((axis**2).sum(-1), 1e-6)
        obj = largest_component(_shift_or(core, 1) & (coverage >= EDGE_COVERAGE))
    shape, iou = classify_shape(obj)

    background_region = ~_shift_or(obj, BACKGROUND_MARGIN) if obj.any() else np.ones_like(obj)
    if background_region.any():
        clutter = np.clip((off_line[background_region] - CLUTTER_DEAD) / (MASK_DISTANCE - CLUTTER_DEAD), 0.0, 1.0)
        cleanliness = _score(float(clutter.mean()), 0.0, CLUTTER_SCALE)
    else:
        cleanliness = 0.0  # nothing but object: no background to be clean
    lit = background_region & (off_line <= CLUTTER_ONSET)
    if lit.sum() >= MIN_LIGHTING_PIXELS:
        shade = ((pixels - bg_rgb) @ shading) / float(shading @ shading)  # [H, W]
        lighting = _score(_plane_residual_rms(shade, lit), LIGHTING_DEAD, LIGHTING_SCALE)
    else:
        lighting = 0.0  # no backdrop left to judge
    vividness, centroid = 0.0, None
    if obj.any() and colour is not None:
        inner = _erode(obj, 1)
        region = inner if inner.any() else obj
        named = np.asarray(PALETTE[colour], dtype=np.float32) / 255.0
        chroma = named - _GREY
        position = float(np.median(((pixels[region] - _GREY) @ chroma) / float(chroma @ chroma)))
        vividness = _score(1.0 - position, VIVIDNESS_DEAD, VIVIDNESS_SCALE)
        ys, xs = np.nonzero(obj)
        centroid = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
    return SceneReading(
        shape=shape,
        shape_iou=iou,
        colour=colour,
        background=background,
        object_fraction=float(obj.mean()),
        cleanliness=cleanliness,
        centroid=centroid,
        lighting=lighting,
        vividness=vividness,
    )


def aesthetic(image: np.ndarray) -> float:
    """The aesthetic score of one [H, W, 3] uint8 image in [0, 1] (mean of its three components)."""
    return read_scene(image).aesthetic


def cleanliness(image: np.ndarray) -> float:
    """The fine aesthetic component of one [H, W, 3] uint8 image: how free of clutter its background is."""
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

    aesthetic: np.ndarray  # the mean of the three components below
    lighting: np.ndarray  # coarse
    vividness: np.ndarray  # medium
    cleanliness: np.ndarray  # fine
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
        rows.append((reading.aesthetic, reading.lighting, reading.vividness, reading.cleanliness, result.aligned, result.shape, result.colour, result.background,
                     reading.object_fraction, cx, cy))
    cols = np.array(rows, dtype=np.float64).reshape(len(rows), 11).T
    return ImageScores(*cols)


assert IMAGE_SIZE == 32  # the border width and margins above are chosen for 32-pixel scenes
