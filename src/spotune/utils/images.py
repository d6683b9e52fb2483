"""Tensor <-> PIL conversion and image grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spotune.utils.io import atomic_path


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> B RGB PIL images (rounded, clamped)."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Tile equally sized images row by row, ``columns`` per row."""
    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int) -> np.ndarray:
    """Write a PNG grid of [B, 3, H, W] images in [-1, 1] atomically; return it as [H, W, 3] uint8."""
    grid = make_grid(to_pil(images), max(1, columns))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return np.asarray(grid)
