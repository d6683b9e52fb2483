"""Image pre-processing for the scorers, on PIL images, reproducing each scorer's published pipeline.

The scorers were trained with torchvision transforms, which this project cannot depend on. The
functions here redo those transforms with PIL and torch, following torchvision's rounding rules,
so that a scorer sees the same pixels it saw in its authors' code:

* :func:`resize_shortest_center_crop`: ``Resize(n, BICUBIC)`` + ``CenterCrop(n)`` (CLIP, ImageReward,
  the LAION aesthetic predictor);
* :func:`resize_longest_pad`: open_clip's ``ResizeMaxSize(n, fill=0)`` (HPS v2: longest side to n,
  centred on a black square);
* :func:`to_normalized_tensor`: ``ToTensor`` + ``Normalize(mean, std)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from spotune.utils.clip_pixels import CLIP_MEAN, CLIP_STD  # re-exported for the scorers


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB mode (generated PNGs already are; palette or grey images get converted)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_shortest_center_crop(image: Image.Image, size: int, offset_rounding: str = "torchvision") -> Image.Image:
    """Shortest side to ``size`` (bicubic), then the central ``size`` x ``size`` square.

    The long side becomes ``int(size * long / short)`` (truncated), as in torchvision and in
    transformers' CLIP image processor. The two differ only in the crop offset when the margin is
    odd: torchvision rounds ``(side - size) / 2``, transformers floors it.

    Args:
        offset_rounding: ``"torchvision"`` (CLIP's, ImageReward's and the aesthetic predictor's code)
            or ``"transformers"`` (scorers whose authors used a transformers processor: PickScore).
    """
    if offset_rounding not in ("torchvision", "transformers"):
        raise ValueError(f"offset_rounding must be 'torchvision' or 'transformers', got {offset_rounding!r}")
    image = to_rgb(image)
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    if offset_rounding == "torchvision":
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    else:
        top, left = (new_h - size) // 2, (new_w - size) // 2
    return image.crop((left, top, left + size, top + size))


def resize_longest_pad(image: Image.Image, size: int, fill: int = 0) -> Image.Image:
    """Longest side to ``size`` (bicubic, ``round`` for the other side), centred on a ``fill`` square.

    The padding splits as open_clip's ``ResizeMaxSize`` does: ``pad // 2`` before, the rest after.
    (open_clip skips the padding when the longest side is already ``size``, which leaves a non-square
    image the ViT cannot take; here such an image is padded as well.)
    """
    image = to_rgb(image)
    w, h = image.size
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    if (new_w, new_h) == (size, size):
        return image
    canvas = Image.new("RGB", (size, size), (fill, fill, fill))
    canvas.paste(image, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def to_normalized_tensor(
    images: Sequence[Image.Image], mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """Equal-sized RGB images -> [B, 3, H, W] float32, scaled to [0, 1] then normalised per channel."""
    arrays = [np.asarray(to_rgb(im), dtype=np.float32) / 255.0 for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, 3, H, W]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
