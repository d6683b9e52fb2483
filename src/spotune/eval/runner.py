"""``spotune eval``: (generate,) score every image with every scorer, and write the report.

Reading order: :func:`run_eval` checks the scorers' weight paths before any work, runs
``spotune generate`` first when asked, collects the image folders, scores them scorer by scorer
(:func:`score_images`: one model in memory at a time), builds the tables and writes the report
folder in a temporary place that is renamed into ``output_dir`` at the end.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from spotune.errors import SpotuneError
from spotune.eval.config import EvalConfig
from spotune.eval.records import ImageItem, collect_images
from spotune.eval.tables import EvalTables, build_tables

logger = logging.getLogger(__name__)


class EvalError(SpotuneError, ValueError):
    """An evaluation that cannot start: missing weights, an output folder in the way."""


@dataclass
class EvalResult:
    output_dir: Path
    report: Path
    tables: EvalTables


def score_images(scorer, items: list[ImageItem], batch_size: int) -> list[float]:
    """Scores of ``items`` in order; images are opened one batch at a time."""
    from tqdm.auto import tqdm

    scores: list[float] = []
    with tqdm(total=len(items), desc=f"{scorer.name}", unit="img", leave=False) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            images = []
            for item in batch:
                try:
                    with Image.open(item.path) as im:
                        images.append(im.convert("RGB"))
                except OSError as exc:
                    raise EvalError(f"{item.path}: not a readable image ({exc})") from None
            values = scorer(images, [item.prompt for item in batch])
            scores.extend(float(v) for v in values)
            bar.update(len(batch))
    return scores


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EvalError(f"output_dir {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise EvalError(f"output_dir {out} already exists and is not empty; choose another or set overwrite=true")


def run_eval(config: EvalConfig) -> EvalResult:
    """Run the whole evaluation of ``config`` and write its report folder."""
    from spotune.eval.report import write_report
    from spotune.eval.scorers import get_scorer, missing_weights

    config.validate()
    out = Path(config.output_dir).expanduser()
    check_output(out, config.overwrite)
    problems = [msg for name in config.scorers for msg in missing_weights(name, **config.scorer_kwargs(name))]
    if problems:
        raise EvalError("missing scorer weights (nothing was scored):\n  " + "\n  ".join(problems))

    folders = list(config.images)
    if config.generate_config:
        from spotune.config import load_config
        from spotune.generation import GenerateConfig, run_generate

        gen_config = load_config(GenerateConfig, config.generate_config)
        run_generate(gen_config)
        if gen_config.output_dir not in folders:
            folders.append(gen_config.output_dir)
    items = collect_images(folders)

    scores: dict[str, dict[str, list[float]]] = {}
    for name in config.scorers:
        scorer = get_scorer(
            name, device=config.device, dtype=config.dtype, batch_size=config.batch_size, **config.scorer_kwargs(name)
        )
        scores[name] = {model: score_images(scorer, model_items, config.batch_size) for model, model_items in items.items()}
        del scorer  # one scorer in memory at a time: ViT-H models are large
        gc.collect()
    tables = build_tables(items, scores, config.baseline)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write_report(tables, staging, config.title, config.report_images)
        if out.exists():
            shutil.rmtree(out)  # checked above: empty, or overwrite was asked for
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return EvalResult(out, out / "report.html", tables)
