"""Writing an evaluation: CSV tables, a markdown summary, PNG plots and an HTML report.

Layout of a report folder::

    scores.csv        one row per image: model, key, file, prompt, seed, category, one column per scorer
    summary.csv       per (scorer, model): n, mean, std, 95% interval
    win_rates.csv     per (scorer, model A, model B): pairs, wins, ties, losses, win rate, 95% interval
    categories.csv    per (scorer, model, category), when the prompts had categories
    summary.json      the same numbers in one file
    report.md         the markdown tables
    report.html       tables, plots and a side-by-side image grid (open it in a browser)
    plots/            scores_<scorer>.png (distributions), categories_<scorer>.png (per-category bars)
    thumbs/           small copies of the images the HTML grid shows

The HTML references only files inside the folder, so the folder can be moved or shared whole.
"""

from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path

from PIL import Image

from spotune.eval.tables import EvalTables
from spotune.utils.html_page import IMAGE_STATUS_SCRIPT

THUMB_SIZE = 256


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pm(summary, digits: int = 3) -> str:
    """``mean ± half-width`` of a summary (``mean`` alone when n = 1)."""
    if math.isnan(summary.half_width):
        return _fmt(summary.mean, digits)
    return f"{summary.mean:.{digits}f} ± {summary.half_width:.{digits}f}"


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    from spotune.utils.io import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


# -- tables ---------------------------------------------------------------------------------------


def write_csvs(tables: EvalTables, folder: Path) -> None:
    """scores.csv, summary.csv, win_rates.csv and (with categories) categories.csv."""
    rows = []
    for model in tables.models:
        for n, item in enumerate(tables.items[model]):
            rows.append(
                [model, item.key, str(item.path), item.prompt_index, item.image_index, item.seed, item.category or "",
                 item.prompt]
                + [repr(float(tables.scores[s][model][n])) for s in tables.scorers]
            )
    header = ["model", "key", "file", "prompt_index", "image_index", "seed", "category", "prompt"] + tables.scorers
    _write_csv(folder / "scores.csv", header, rows)
    _write_csv(
        folder / "summary.csv",
        ["scorer", "model", "n", "mean", "std", "ci95_low", "ci95_high"],
        [[s, m, v.n, v.mean, v.std, v.ci_low, v.ci_high] for (s, m), v in tables.summaries.items()],
    )
    _write_csv(
        folder / "win_rates.csv",
        ["scorer", "model_a", "model_b", "pairs", "a_wins", "ties", "b_wins", "a_win_rate", "ci95_low", "ci95_high"],
        [[p.scorer, p.model_a, p.model_b, p.result.n, p.result.wins, p.result.ties, p.result.losses, p.result.rate,
          p.result.ci_low, p.result.ci_high] for p in tables.pairs],
    )
    if tables.categories:
        _write_csv(
            folder / "categories.csv",
            ["scorer", "model", "category", "n", "mean", "std", "ci95_low", "ci95_high"],
            [[s, m, c, v.n, v.mean, v.std, v.ci_low, v.ci_high] for (s, m, c), v in sorted(tables.categories.items())],
        )


def summary_json(tables: EvalTables) -> dict:
    return {
        "models": tables.models,
        "scorers": tables.scorers,
        "summary": [{"scorer": s, "model": m, **v.to_dict()} for (s, m), v in tables.summaries.items()],
        "win_rates": [
            {"scorer": p.scorer, "model_a": p.model_a, "model_b": p.model_b, **p.result.to_dict()} for p in tables.pairs
        ],
        "unpaired": [list(pair) for pair in tables.unpaired],
        "categories": [
            {"scorer": s, "model": m, "category": c, **v.to_dict()} for (s, m, c), v in sorted(tables.categories.items())
        ],
    }


def markdown_report(tables: EvalTables, title: str = "spotune evaluation") -> str:
    """Markdown: a mean ± 95%-interval table (models x scorers) and a win-rate table."""
    lines = [f"# {title}", "", "Mean ± half-width of the 95% confidence interval (Student t).", ""]
    lines.append("| model | images | " + " | ".join(tables.scorers) + " |")
    lines.append("| --- | ---: | " + " | ".join("---:" for _ in tables.scorers) + " |")
    for model in tables.models:
        cells = [_pm(tables.summaries[(s, model)]) for s in tables.scorers]
        lines.append(f"| {model} | {len(tables.items[model])} | " + " | ".join(cells) + " |")
    if tables.pairs:
        lines += ["", "## Win rates on identical prompts and seeds", "",
                  "| scorer | model A | vs model B | pairs | A wins | 95% CI |", "| --- | --- | --- | ---: | ---: | --- |"]
        for p in tables.pairs:
            r = p.result
            lines.append(
                f"| {p.scorer} | {p.model_a} | {p.model_b} | {r.n} | {100 * r.rate:.1f}% | "
                f"{_fmt(100 * r.ci_low, 1)}% – {_fmt(100 * r.ci_high, 1)}% |"
            )
    for a, b in tables.unpaired:
        lines.append(f"\n{a} and {b} share no prompt with the same seed: no win rate.")
    return "\n".join(lines) + "\n"


# -- plots ----------------------------------------------------------------------------------------


def _save_figure(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from spotune.utils.io import atomic_path

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def write_plots(tables: EvalTables, folder: Path) -> list[Path]:
    """A score distribution per scorer, and per-category bars when categories exist (Agg, no display)."""
    from matplotlib.figure import Figure  # the object API needs no pyplot state and no display

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for scorer in tables.scorers:
        fig = Figure(figsize=(6.4, 3.6))
        ax = fig.add_subplot()
        values = [tables.scores[scorer][m] for m in tables.models]
        low, high = min(min(v) for v in values), max(max(v) for v in values)
        bins = 20 if high > low else 1
        for model, vals in zip(tables.models, values):
            ax.hist(vals, bins=bins, range=(low, high) if high > low else None, alpha=0.5, label=model)
        ax.set_title(f"{scorer}: score distribution")
        ax.set_xlabel(scorer)
        ax.set_ylabel("images")
        ax.legend()
        path = folder / f"scores_{scorer}.png"
        _save_figure(fig, path)
        written.append(path)
    categories = tables.category_names
    if categories:
        for scorer in tables.scorers:
            fig = Figure(figsize=(max(6.4, 0.5 * len(categories) * len(tables.models)), 3.8))
            ax = fig.add_subplot()
            width = 0.8 / len(tables.models)
            for m, model in enumerate(tables.models):
                xs, means, errs = [], [], []
                for c, category in enumerate(categories):
                    summary = tables.categories.get((scorer, model, category))
                    if summary is None:
                        continue
                    xs.append(c + (m - (len(tables.models) - 1) / 2) * width)
                    means.append(summary.mean)
                    errs.append(0.0 if math.isnan(summary.half_width) else summary.half_width)
                ax.bar(xs, means, width=width, yerr=errs, capsize=2, label=model)
            ax.set_xticks(range(len(categories)))
            ax.set_xticklabels(categories, rotation=45, ha="right")
            ax.set_title(f"{scorer} by category (mean, 95% CI)")
            ax.legend()
            path = folder / f"categories_{scorer}.png"
            _save_figure(fig, path)
            written.append(path)
    return written


# -- HTML -----------------------------------------------------------------------------------------


def grid_keys(tables: EvalTables, limit: int) -> list[str]:
    """Keys of the images every model has (first ``limit``), for the side-by-side grid."""
    if not tables.models or limit == 0:
        return []
    common = set.intersection(*({i.key for i in tables.items[m]} for m in tables.models))
    return [i.key for i in tables.items[tables.models[0]] if i.key in common][:limit]


def write_thumbnails(tables: EvalTables, keys: list[str], folder: Path) -> dict[tuple[str, str], Path]:
    """Small PNG copies (at most 256 px) of the grid's images; returns (model, key) -> thumbnail path."""
    from spotune.utils.io import atomic_path

    out = {}
    for m_index, model in enumerate(tables.models):
        by_key = {i.key: i for i in tables.items[model]}
        sub = folder / f"m{m_index}"  # model names may hold characters unfit for URLs
        sub.mkdir(parents=True, exist_ok=True)
        for key in keys:
            with Image.open(by_key[key].path) as im:
                thumb = im.convert("RGB")
                thumb.thumbnail((THUMB_SIZE, THUMB_SIZE))
            path = sub / f"{key}.png"
            with atomic_path(path) as tmp:
                thumb.save(tmp, format="PNG")
            out[(model, key)] = path
    return out


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.grid td { vertical-align: top; text-align: center; }
td.text, th.text, .grid td.prompt { text-align: left; }
.grid td.prompt { max-width: 22em; font-size: 90%; }
.grid img { width: 192px; height: auto; image-rendering: auto; display: block; margin: 0 auto; }
.plot { max-width: 640px; display: block; margin: 0.5em 0; }
.best { font-weight: bold; }
img.broken { outline: 3px solid #c00; min-width: 64px; min-height: 64px; }
#image-status { color: #555; font-size: 90%; }
"""

_SCRIPT = IMAGE_STATUS_SCRIPT


def html_report(
    tables: EvalTables,
    folder: Path,
    plots: list[Path],
    thumbs: dict[tuple[str, str], Path],
    keys: list[str],
    title: str = "spotune evaluation",
) -> str:
    """The report page; every path in it is relative to ``folder``."""
    e = html.escape

    def rel(path: Path) -> str:
        return e(path.relative_to(folder).as_posix(), quote=True)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>{len(tables.models)} model(s), {len(tables.scorers)} scorer(s). Mean ± half-width of the 95% "
        "confidence interval (Student t); the best mean per scorer is in bold.</p>",
        '<p id="image-status">images not checked yet</p>',
        '<h2>Scores</h2><table id="summary-table"><thead><tr><th>model</th><th>images</th>',
    ]
    parts += [f"<th>{e(s)}</th>" for s in tables.scorers]
    parts.append("</tr></thead><tbody>")
    best = {s: max(tables.models, key=lambda m: tables.summaries[(s, m)].mean) for s in tables.scorers}
    for model in tables.models:
        parts.append(f"<tr><td>{e(model)}</td><td>{len(tables.items[model])}</td>")
        for s in tables.scorers:
            cls = ' class="best"' if best[s] == model and len(tables.models) > 1 else ""
            parts.append(f"<td{cls}>{e(_pm(tables.summaries[(s, model)]))}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    if tables.pairs:
        parts.append(
            '<h2>Win rates on identical prompts and seeds</h2><table id="win-rates"><thead><tr><th>scorer</th>'
            '<th class="text">model A</th><th class="text">vs model B</th><th>pairs</th><th>A wins</th><th>95% CI</th>'
            "</tr></thead><tbody>"
        )
        for p in tables.pairs:
            r = p.result
            parts.append(
                f'<tr><td>{e(p.scorer)}</td><td class="text">{e(p.model_a)}</td><td class="text">{e(p.model_b)}</td><td>{r.n}</td>'
                f"<td>{100 * r.rate:.1f}%</td><td>{e(_fmt(100 * r.ci_low, 1))}% – {e(_fmt(100 * r.ci_high, 1))}%</td></tr>"
            )
        parts.append("</tbody></table>")
    for a, b in tables.unpaired:
        parts.append(f"<p>{e(a)} and {e(b)} share no prompt with the same seed: no win rate.</p>")
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f'<img class="plot" src="{rel(p)}" alt="{e(p.stem)}">' for p in plots]
    if keys:
        parts.append('<h2>Side by side</h2><table class="grid" id="image-grid"><thead><tr><th>prompt</th>')
        parts += [f"<th>{e(m)}</th>" for m in tables.models]
        parts.append("</tr></thead><tbody>")
        index = {m: {i.key: n for n, i in enumerate(tables.items[m])} for m in tables.models}
        for key in keys:
            first = tables.items[tables.models[0]][index[tables.models[0]][key]]
            seed = f" · seed {first.seed}" if first.seed is not None else ""
            parts.append(f'<tr><td class="prompt">{e(first.prompt)}<br><small>{e(key)}{seed}</small></td>')
            for model in tables.models:
                n = index[model][key]
                scores = " · ".join(f"{s} {tables.scores[s][model][n]:.3f}" for s in tables.scorers)
                parts.append(
                    f'<td><img src="{rel(thumbs[(model, key)])}" alt="{e(model)} {e(key)}"><small>{e(scores)}</small></td>'
                )
            parts.append("</tr>")
        parts.append("</tbody></table>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


def write_report(tables: EvalTables, folder: Path, title: str = "spotune evaluation", report_images: int = 12) -> Path:
    """Write every file of a report folder (see the module docstring); returns ``report.html``."""
    from spotune.utils.io import atomic_write_json, atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    write_csvs(tables, folder)
    atomic_write_json(folder / "summary.json", summary_json(tables))
    atomic_write_text(folder / "report.md", markdown_report(tables, title))
    plots = write_plots(tables, folder / "plots")
    keys = grid_keys(tables, report_images)
    thumbs = write_thumbnails(tables, keys, folder / "thumbs")
    page = folder / "report.html"
    atomic_write_text(page, html_report(tables, folder, plots, thumbs, keys, title))
    return page
