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
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from spotune.errors import SpotuneError
from spotune.eval.config import EvalConfig
from spotune.eval.records import ImageItem, collect_images
from spotune.eval.tables import EvalTables, build_tables
from spotune.utils.io import apply_umask_modes, aside_name, disk_full_from, make_temp_dir, remove_stale_temporaries
from spotune.utils.preemption import signals_held
from spotune.utils.outputs import describe_entries, foreign_entries, write_output_marker
from spotune.utils.paths import resolve_user_path

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


# What a report folder holds (write_report), for reports written before the output marker existed.
REPORT_LAYOUT = frozenset({
    "report.html", "report.md", "scores.csv", "summary.csv", "win_rates.csv", "summary.json", "plots", "thumbs",
})


def check_output(out: Path, overwrite: bool, image_folders: list[Path] = ()) -> None:
    """Refuse an output that is, holds or lies in a folder being evaluated; a non-empty one without ``overwrite``;
    and, with it, one holding anything spotune did not write there (listed in the message)."""
    resolved = resolve_user_path(out, "--out (output_dir=) FOLDER")
    for folder in image_folders:
        folder = resolve_user_path(folder, "--images FOLDER")
        if resolved == folder or resolved in folder.parents or folder in resolved.parents:
            # Replacing the report would delete images; a report among them would be read as images.
            raise EvalError(
                f"output_dir {out} is, holds or lies inside the image folder {folder} being evaluated; writing the "
                "report there would delete those images or mix with them. Choose another output_dir"
            )
    if out.exists() and not out.is_dir():
        raise EvalError(f"output_dir {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise EvalError(f"output_dir {out} already exists and is not empty; choose another or set overwrite=true")
        names = foreign_entries(out, REPORT_LAYOUT)
        if names:
            raise EvalError(
                f"output_dir {out} is not an earlier spotune report: overwrite=true would delete "
                f"{describe_entries(out, names)}. Move them or choose another output_dir"
            )


def run_eval(config: EvalConfig) -> EvalResult:
    """Run the whole evaluation of ``config`` and write its report folder."""
    from spotune.eval.report import write_report
    from spotune.eval.scorers import get_scorer, missing_weights

    config.validate()
    out = Path(config.output_dir).expanduser()
    folders = [Path(f).expanduser() for f in config.images]
    gen_config = None
    if config.generate_config:
        from spotune.config import load_config
        from spotune.generation import GenerateConfig

        gen_config = load_config(GenerateConfig, config.generate_config)
        folders.append(Path(gen_config.output_dir).expanduser())
    check_output(out, config.overwrite, folders)
    from spotune.eval.config import SCORER_PATH_KEYS
    from spotune.hints import config_keys

    # Inside config_keys, the scorers' messages name eval's keys (pickscore_model=...), not their arguments.
    problems = []
    for name in config.scorers:
        with config_keys(SCORER_PATH_KEYS[name]):
            problems += missing_weights(name, **config.scorer_kwargs(name))
    if problems:
        raise EvalError("missing scorer weights (nothing was scored):\n  " + "\n  ".join(problems))

    if gen_config is not None:
        from spotune.generation import run_generate

        run_generate(gen_config)
    items = collect_images(list(dict.fromkeys(folders)))

    scores: dict[str, dict[str, list[float]]] = {}
    for name in config.scorers:
        with config_keys(SCORER_PATH_KEYS[name]):
            scorer = get_scorer(
                name, device=config.device, dtype=config.dtype, batch_size=config.batch_size, **config.scorer_kwargs(name)
            )
        scores[name] = {model: score_images(scorer, model_items, config.batch_size) for model, model_items in items.items()}
        del scorer  # one scorer in memory at a time: ViT-H models are large
        gc.collect()
    tables = build_tables(items, scores, config.baseline)

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent)
    staging = make_temp_dir(out)
    try:
        write_report(tables, staging, config.title, config.report_images)
        write_output_marker(staging, "eval-report")  # lets a later overwrite=true know this folder is ours
        apply_umask_modes(staging)
        if out.exists():
            check_output(out, config.overwrite, folders)  # again: the folder may have changed meanwhile
            old = aside_name(out)
            with signals_held():  # a Ctrl-C or SIGTERM between the renames would leave neither in place
                os.replace(out, old)  # the old report stays whole until the new one has its name
                os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        full = disk_full_from(exc, out, staging)  # names the report folder, not its temporary one
        if full is not None:
            raise full from exc
        raise
    return EvalResult(out, out / "report.html", tables)
