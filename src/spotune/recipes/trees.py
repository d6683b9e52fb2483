"""Write a sampling tree (:mod:`spotune.diffusion.tree`) as ``RUN/trees/iter-XXXXXXXX.png`` and ``.json``.

The picture: one row per recorded step (its index, t, the judge's t, the pair's softmax gap against the
threshold), one column per candidate; the winner framed green and the loser red (a thick frame when the
pair was kept, a thin one when the judge was not decisive enough), each candidate's score under it,
and a blue bar under the candidate the chain went on from. The JSON beside it holds every number.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from spotune.checkpoint import checkpoint_name
from spotune.diffusion.tree import SamplingTree, TreeStep
from spotune.utils.io import atomic_path, atomic_write_json

TREES_DIR = "trees"
WINNER, LOSER, CONTINUED = (46, 158, 68), (211, 51, 51), (40, 96, 220)
LABEL_WIDTH, PAD, TEXT_HEIGHT = 210, 8, 14


def tree_paths(output_dir: Path, iteration: int) -> tuple[Path, Path]:
    """(png, json) of the tree recorded in ``iteration`` (1-based, the iteration count after it)."""
    stem = checkpoint_name(iteration)  # iter-XXXXXXXX, the name its checkpoint has
    folder = Path(output_dir) / TREES_DIR
    return folder / f"{stem}.png", folder / f"{stem}.json"


def _label(row: TreeStep) -> list[str]:
    lines = [f"step {row.step_index}   t = {row.timestep}"]
    if row.judge_timestep is None:
        lines.append("not judged (inner step)")
        return lines
    lines.append(f"judged at t = {row.judge_timestep}")
    if row.threshold is None:
        lines.append(f"gap {row.gap:.3f}: kept (every final pair)")
    else:
        verdict = "kept" if row.kept else "dropped"
        lines.append(f"gap {row.gap:.3f} {'>' if row.kept else '<='} {row.threshold:g}: {verdict}")
    return lines


def render_tree(tree: SamplingTree, prompt: str, iteration: int) -> Image.Image:
    """The tree's picture (see the module docstring)."""
    font = ImageFont.load_default()
    k = max(row.images.shape[0] for row in tree.steps)
    cell_h, cell_w = tree.steps[0].images.shape[-2:]
    col_w, row_h = cell_w + 2 * PAD, cell_h + 2 * PAD + 2 * TEXT_HEIGHT
    header = [f"iteration {iteration}   sampler {tree.sampler}   prompt {tree.prompt_row}:"]
    header += textwrap.wrap(prompt, width=max(40, (LABEL_WIDTH + k * col_w) // 7))[:3] or ['""']
    top = PAD + TEXT_HEIGHT * len(header) + PAD
    canvas = Image.new("RGB", (LABEL_WIDTH + k * col_w + PAD, top + len(tree.steps) * row_h + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for n, line in enumerate(header):
        draw.text((PAD, PAD + n * TEXT_HEIGHT), line, fill="black", font=font)
    for r, row in enumerate(tree.steps):
        y = top + r * row_h
        for n, line in enumerate(_label(row)):
            draw.text((PAD, y + PAD + n * TEXT_HEIGHT), line, fill="black", font=font)
        for j in range(row.images.shape[0]):
            x = LABEL_WIDTH + j * col_w
            cell = Image.fromarray(np.ascontiguousarray(row.images[j].permute(1, 2, 0).numpy()))
            canvas.paste(cell, (x + PAD, y + PAD))
            for index, colour in ((row.winner, WINNER), (row.loser, LOSER)):
                if index == j:
                    width = 4 if row.kept else 1
                    draw.rectangle([x + PAD - width, y + PAD - width, x + PAD + cell_w + width - 1, y + PAD + cell_h + width - 1],
                                   outline=colour, width=width)
            if row.scores is not None:
                draw.text((x + PAD, y + PAD + cell_h + 3), f"{row.scores[j]:.3f}", fill="black", font=font)
            if row.continued == j:
                draw.rectangle([x + PAD, y + PAD + cell_h + TEXT_HEIGHT + 4, x + PAD + cell_w - 1, y + PAD + cell_h + TEXT_HEIGHT + 8],
                               fill=CONTINUED)
    return canvas


def tree_record(tree: SamplingTree, prompt: str, iteration: int, image_name: str) -> dict[str, Any]:
    """The JSON written beside the picture."""
    return {
        "iteration": iteration,
        "prompt": prompt,
        "prompt_row": tree.prompt_row,
        "sampler": tree.sampler,
        "image": image_name,
        "candidates": max(row.images.shape[0] for row in tree.steps),
        "steps": [row.numbers() for row in tree.steps],
    }


def write_tree(output_dir: Path, tree: SamplingTree, prompt: str, iteration: int) -> tuple[Path, Image.Image]:
    """Write the tree's PNG and JSON (atomically; the JSON last, so a listed JSON has its picture); (png, picture)."""
    png, record = tree_paths(output_dir, iteration)
    picture = render_tree(tree, prompt, iteration)
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(png) as tmp:
        picture.save(tmp, format="PNG")
    atomic_write_json(record, tree_record(tree, prompt, iteration, png.name))
    return png, picture
