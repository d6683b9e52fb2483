"""The run page: one static HTML file, ``RUN/report.html``, of everything a training run has written.

Written by ``spotune train`` at every checkpoint and by ``spotune view RUN`` on demand, from the run
folder alone: ``config.yaml`` (and the configs of resumes), ``logs/metrics.jsonl`` (curves, and the
per-step statistics as heat maps over iterations), ``samples/`` (validation grids per epoch beside the
base model's, same seeds), ``trees/`` (the recorded sampling trees with their numbers) and
``checkpoints/`` (each with the ``spotune export`` command that writes it for webui / ComfyUI).
Charts are inline SVG and images are files of the run folder named by relative paths, so the page
opens from a ``file://`` URL with no server and no network; a run that is still going shows what
exists so far.
"""

from __future__ import annotations

import fcntl
import html
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from spotune.checkpoint import list_checkpoints, read_state
from spotune.errors import SpotuneError
from spotune.recipes.run_log import read_metrics
from spotune.utils.html_page import IMAGE_STATUS_SCRIPT
from spotune.utils.io import atomic_write_text
from spotune.utils.run_lock import LOCK_FILE
from spotune.view.svg import heat_map, line_chart

PAGE_NAME = "report.html"
# Marks a page this module wrote: `spotune view` replaces only such a file.
GENERATOR = "spotune run page"
BASE_GRID = "base.png"

# The curves: (title, [(series label, metrics key)]).
CURVES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("loss", (("loss", "loss"),)),
    ("likelihood ratios (clipped)", (("winner", "ratio_win"), ("loser", "ratio_lose"))),
    ("log-ratio to the reference", (("winner", "log_ratio_win"), ("loser", "log_ratio_lose"))),
    ("decisive pairs per round", (("pairs", "pairs"),)),
    ("fraction of judged pairs kept", (("kept", "valid_fraction"),)),
    ("judge score of the final candidates", (("mean", "score_mean"),)),
    ("learning rate", (("lr", "lr"),)),
    ("gradient norm (before clipping)", (("mean", "grad_norm"), ("max", "grad_norm_max"))),
    ("seconds per phase", (("sampling", "seconds_sampling"), ("training", "seconds_training"))),
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1250px; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; font-size: 90%; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; }
.pair { display: flex; gap: 12px; align-items: flex-start; flex-wrap: wrap; }
.pair figure { margin: 0; } figcaption { font-size: 85%; color: #555; }
img { max-width: 100%; image-rendering: pixelated; }
img.broken { outline: 3px solid #c00; min-width: 64px; min-height: 64px; }
code, pre { background: #f4f4f4; } pre { padding: 6px; overflow-x: auto; }
#image-status { color: #555; font-size: 90%; }
.kept { color: #2e9e44; font-weight: bold; } .dropped { color: #888; }
"""


# Counts script errors on the page's root element (data-script-errors), which a headless browser's test reads.
_ERROR_COUNTER = """
document.documentElement.setAttribute('data-script-errors', '0');
window.addEventListener('error', function () {
  var root = document.documentElement;
  root.setAttribute('data-script-errors', String(Number(root.getAttribute('data-script-errors')) + 1));
});
"""


class RunPageError(SpotuneError):
    """The folder is not a run, or the page's path holds a file spotune did not write."""


def run_is_going(run: Path) -> bool:
    """Whether another process holds the run folder's lock (a training still going)."""
    lock = run / LOCK_FILE
    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the descriptor releases a lock it took
    return False


def _series(records: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(r["iteration"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]


def _per_step(records: list[dict[str, Any]], name: str) -> tuple[list[int], list[int], list[list[float | None]]]:
    """(iterations, steps, values[iteration][step]) of one per-step statistic."""
    with_steps = [r for r in records if isinstance(r.get("per_step"), dict) and r["per_step"].get("step")]
    if not with_steps:
        return [], [], []
    steps = sorted({s for r in with_steps for s in r["per_step"]["step"]})
    values = []
    for r in with_steps:
        row = dict(zip(r["per_step"]["step"], r["per_step"].get(name) or []))
        values.append([row.get(s) for s in steps])
    return [r["iteration"] for r in with_steps], steps, values


def _mean_gap(record: dict[str, Any]) -> float | None:
    gaps = [g for g in (record.get("per_step") or {}).get("gap") or [] if g is not None]
    return sum(gaps) / len(gaps) if gaps else None


def _rel(run: Path, path: Path) -> str:
    return html.escape(path.relative_to(run).as_posix(), quote=True)


def _config_section(run: Path) -> str:
    e = html.escape
    parts = ["<h2>Configuration</h2>"]
    configs = [run / "config.yaml", *sorted(run.glob("config.resumed-*.yaml"))]
    for path in configs:
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            label = "the run's config" if path.name == "config.yaml" else f"resumed with {path.name}"
            parts.append(f'<details><summary>{e(label)} (<code>{e(path.name)}</code>)</summary><pre>{e(text)}</pre></details>')
    if len(parts) == 1:
        parts.append("<p>No config.yaml yet.</p>")
    return "".join(parts)


def _curves_section(records: list[dict[str, Any]]) -> str:
    if not records:
        return "<h2>Curves</h2><p>No iteration logged yet (logs/metrics.jsonl).</p>"
    charts = [line_chart(title, {label: _series(records, key) for label, key in keys}) for title, keys in CURVES]
    gap = [(r["iteration"], g) for r in records if (g := _mean_gap(r)) is not None]
    charts.insert(4, line_chart("judge's softmax gap (mean over steps)", {"gap": gap}))
    parts = ['<h2>Curves</h2><div class="charts" id="curves">', *[c for c in charts if c], "</div>"]
    for name, title in (("pair_rate", "pair rate per step (kept pairs / prompts)"),
                        ("gap", "judge's softmax gap per step (best vs worst candidate)")):
        iterations, steps, values = _per_step(records, name)
        parts.append(heat_map(title, iterations, steps, values))
    return "".join(parts)


def _samples_section(run: Path) -> str:
    folder = run / "samples"
    grids = sorted(p for p in folder.glob("*.png") if p.name != BASE_GRID) if folder.is_dir() else []
    if not grids:
        return "<h2>Validation images</h2><p>None yet (validation_prompts, validate_every_epochs).</p>"
    base = folder / BASE_GRID
    parts = ["<h2>Validation images</h2><p>The same prompts and seeds at each validation; the base model's beside them.</p>"]
    for grid in grids:
        parts.append('<div class="pair">')
        if base.is_file():
            parts.append(f'<figure><img src="{_rel(run, base)}" alt="base model"><figcaption>base model</figcaption></figure>')
        parts.append(f'<figure><img src="{_rel(run, grid)}" alt="{html.escape(grid.stem)}"><figcaption>{html.escape(grid.stem)}</figcaption></figure></div>')
    return "".join(parts)


def _tree_table(steps: list[dict[str, Any]]) -> str:
    e = html.escape
    rows = ["<table><tr><th>step</th><th>t</th><th>judged at</th><th>scores</th><th>gap</th><th>threshold</th>"
            "<th>pair</th><th>winner</th><th>loser</th><th>continued</th></tr>"]
    for s in steps:
        scores = " ".join(f"{v:.4g}" for v in s["scores"]) if s.get("scores") else "-"
        kept = s.get("kept")
        verdict = "-" if kept is None else ('<span class="kept">kept</span>' if kept else '<span class="dropped">dropped</span>')
        cells = [s["step_index"], s["timestep"], s.get("judge_timestep"), scores,
                 None if s.get("gap") is None else f"{s['gap']:.4f}", s.get("threshold")]
        rows.append("<tr>" + "".join(f"<td>{e('-' if c is None else str(c))}</td>" for c in cells) + f"<td>{verdict}</td>"
                    + "".join(f"<td>{e('-' if s.get(k) is None else str(s[k]))}</td>" for k in ("winner", "loser", "continued"))
                    + "</tr>")
    rows.append("</table>")
    return "".join(rows)


def _trees_section(run: Path) -> str:
    folder = run / "trees"
    records = []
    for path in sorted(folder.glob("iter-*.json")) if folder.is_dir() else []:
        try:
            records.append((path, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError):
            continue
    if not records:
        return "<h2>Sampling trees</h2><p>None recorded (tree_every).</p>"
    e = html.escape
    parts = ["<h2>Sampling trees</h2><p>Rows are steps, columns the k candidates of one x_t: the winner framed green, "
             "the loser red (thick when the pair was kept), each candidate's score under it, a blue bar under the "
             "candidate the chain went on from.</p>"]
    for path, record in records:
        image = path.with_name(str(record.get("image") or path.with_suffix(".png").name))
        parts.append(f'<h3 id="tree-{e(path.stem)}">Iteration {e(str(record.get("iteration")))}: '
                     f'&ldquo;{e(str(record.get("prompt", "")))}&rdquo;</h3>')
        parts.append(f'<img class="tree" src="{_rel(run, image)}" alt="sampling tree {e(path.stem)}">')
        parts.append(f"<details><summary>the numbers of each step</summary>{_tree_table(record.get('steps') or [])}</details>")
    return "".join(parts)


def _export_command(run: Path, checkpoint: Path, finetune: str) -> str:
    if finetune == "lora":
        output = f"{run.name}-{checkpoint.name}.safetensors"
        return f"spotune export {shlex.quote(str(checkpoint))} --format webui --output {shlex.quote(output)}"
    return f"spotune export {shlex.quote(str(checkpoint))} --format merged --output {shlex.quote(f'{run.name}-{checkpoint.name}')}"


def _checkpoints_section(run: Path) -> str:
    e = html.escape
    checkpoints = list_checkpoints(run)
    if not checkpoints:
        return "<h2>Checkpoints</h2><p>None yet.</p>"
    rows = ['<h2>Checkpoints</h2><p>A webui / kohya LoRA file goes into ComfyUI\'s <code>models/loras</code> or '
            "webui's <code>models/Lora</code> (see the export docs for the other formats).</p>"
            '<table id="checkpoints"><tr><th>checkpoint</th><th>iteration</th><th>epoch</th><th>export</th></tr>']
    for checkpoint in checkpoints:
        try:
            state = read_state(checkpoint)
        except SpotuneError:
            continue
        command = _export_command(run.resolve(), checkpoint.resolve(), str(state.get("finetune", "lora")))
        rows.append(f"<tr><td>{e(checkpoint.name)}</td><td>{e(str(state.get('iteration')))}</td>"
                    f"<td>{float(state.get('epoch') or 0):.2f}</td><td><code>{e(command)}</code></td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _summary(run: Path, records: list[dict[str, Any]], going: bool) -> str:
    e = html.escape
    config = {}
    path = run / "config.yaml"
    if path.is_file():
        from spotune.config import read_config_file

        try:
            config = read_config_file(path)
        except SpotuneError:
            config = {}
    facts = [
        ("model", config.get("pretrained_model")),
        ("algorithm", config.get("algorithm", "spo")),
        ("fine-tuning", config.get("finetune")),
        ("judge", config.get("judge")),
        ("iterations logged", records[-1]["iteration"] if records else 0),
        ("status", "still going (its folder is locked by a live process)" if going else "not running"),
        ("last logged", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(records[-1]["time"])) if records and records[-1].get("time") else None),
    ]
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in facts if v is not None)
    return f'<table id="summary">{rows}</table>'


def build_run_page(run: str | Path, going: bool | None = None) -> str:
    """The page's HTML for run folder ``run`` (``going``: whether the run is still training; probed when None)."""
    run = Path(run)
    if not (run / "config.yaml").is_file() and not (run / "checkpoints").is_dir():
        raise RunPageError(f"{run}: not a spotune run folder (no config.yaml, no checkpoints/); pass the output_dir of a spotune train run")
    records = read_metrics(run)
    going = run_is_going(run) if going is None else going
    e = html.escape
    body = [
        _summary(run, records, going),
        '<p id="image-status">images not checked yet</p>',
        _curves_section(records),
        _samples_section(run),
        _trees_section(run),
        _checkpoints_section(run),
        _config_section(run),
    ]
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{GENERATOR}">'
        f"<title>spotune run: {e(run.resolve().name)}</title><style>{_CSS}</style><script>{_ERROR_COUNTER}</script></head><body>"
        f"<h1>spotune run: {e(run.resolve().name)}</h1>" + "\n".join(body)
        + f"<script>{IMAGE_STATUS_SCRIPT}</script></body></html>\n"
    )


def check_page_path(path: Path) -> None:
    """Refuse a page path that is a folder or holds a file this module did not write."""
    if path.is_dir():
        raise RunPageError(f"{path}: is a folder; --output takes the HTML file to write")
    if path.exists():
        head = path.read_text(encoding="utf-8", errors="replace")[:600]
        if GENERATOR not in head:
            raise RunPageError(f"{path}: exists and was not written by spotune view; choose another --output")


def write_run_page(run: str | Path, output: str | Path | None = None, going: bool | None = None) -> Path:
    """Write the page (atomically) to ``output`` (default ``RUN/report.html``); returns its path."""
    run = Path(run)
    path = Path(output) if output is not None else run / PAGE_NAME
    check_page_path(path)
    text = build_run_page(run, going)
    if output is not None and path.resolve().parent != run.resolve():
        # A page outside the run folder: its image paths are made relative to where it is written.
        text = _relocate(text, run, path.parent)
    atomic_write_text(path, text)
    return path


def _relocate(text: str, run: Path, folder: Path) -> str:
    """Rewrite the page's run-relative image sources for a page written in ``folder``."""
    import re

    prefix = Path(os.path.relpath(run.resolve(), folder.resolve())).as_posix()
    return re.sub(r'src="(?!data:|https?:)([^"]+)"', lambda m: f'src="{html.escape(prefix, quote=True)}/{m.group(1)}"', text)
