"""Comparison grids: one row per model, one column per (prompt, seed), labelled."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from spotune.utils.io import atomic_path

LABEL_WIDTH = 140
HEADER_HEIGHT = 18
MAX_TILE = 256
MIN_TILE = 128  # tiny test images are upscaled so that labels fit


def _fit(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def draw_grid(
    rows: Sequence[tuple[str, Sequence[Path | None]]],
    column_labels: Sequence[str],
    tile: int | None = None,
) -> Image.Image:
    """Lay images out in a labelled grid.

    Args:
        rows: (row label, image paths) per row; ``None`` leaves a cell grey.
        column_labels: one label per column.
        tile: cell size in pixels (default: the first image's width, at most 256).
    Returns:
        The grid as an RGB image.
    """
    first = next((p for _, paths in rows for p in paths if p is not None), None)
    if tile is None:
        tile = MAX_TILE
        if first is not None:
            with Image.open(first) as im:
                tile = max(MIN_TILE, min(MAX_TILE, im.width))
    n_cols = len(column_labels)
    canvas = Image.new("RGB", (LABEL_WIDTH + n_cols * tile, HEADER_HEIGHT + len(rows) * tile), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, label in enumerate(column_labels):
        draw.text((LABEL_WIDTH + c * tile + 2, 3), _fit(label, draw, font, tile - 4), fill="black", font=font)
    for r, (label, paths) in enumerate(rows):
        top = HEADER_HEIGHT + r * tile
        draw.text((4, top + tile // 2 - 6), _fit(label, draw, font, LABEL_WIDTH - 8), fill="black", font=font)
        for c, path in enumerate(paths):
            box = (LABEL_WIDTH + c * tile, top)
            if path is None:
                canvas.paste((200, 200, 200), box + (box[0] + tile, box[1] + tile))
                continue
            with Image.open(path) as im:
                canvas.paste(im.convert("RGB").resize((tile, tile), Image.BICUBIC), box)
    return canvas


def save_grid(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def comparison_grid(root: Path, columns: int = 8, out_file: Path | None = None) -> Path | None:
    """``root/grid.png`` from every model folder under a generation root, on the seeds they share.

    Returns:
        The grid's path, or ``None`` when the models share no image.
    """
    from spotune.generation.layout import GRID_FILE, model_folders, read_metadata

    folders = model_folders(root)
    by_model = {f.name: {(r["prompt_index"], r["image_index"]): r for r in read_metadata(f)} for f in folders}
    if not by_model:
        return None
    common = set.intersection(*(set(records) for records in by_model.values()))
    keys = sorted(common)[:columns]
    if not keys:
        return None
    first_model = next(iter(by_model.values()))
    labels = [f"#{pi} seed {first_model[(pi, ii)].get('seed', '?')}" for pi, ii in keys]
    rows = [(f.name, [f / by_model[f.name][k]["file"] for k in keys]) for f in folders]
    return save_grid(draw_grid(rows, labels), out_file or root / GRID_FILE)
