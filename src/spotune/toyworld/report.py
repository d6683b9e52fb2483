"""The demo's report: the terminal table, ``report.json``, ``grid.png``, training-curve plots, ``report.html``."""

from __future__ import annotations

import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from spotune.toyworld.evaluate import ModelResult, compare
from spotune.utils.io import atomic_path, atomic_write_text

GRID_SCALE = 3
TARGETS = {"aesthetic_win_rate": 0.65, "alignment_drop_points": 2.0, "seconds_total": 600.0}


# ================================================================================================
# numbers
# ================================================================================================
def build_report(
    results: list[ModelResult],
    stages: dict[str, dict[str, Any]],
    pairs_summary: dict[str, Any],
    spm_record: dict[str, Any],
    pickscore_record: dict[str, Any],
    settings: dict[str, Any],
    seconds_total: float,
    world: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything ``report.json`` holds. ``results[0]`` is the base model; ``results[1]`` (SPO when it ran)
    gives the headline ``*_spo`` numbers and ``headline_model`` names it; every model is in ``models``."""
    base, spo = results[0], results[1]
    models = {r.name: r.summary() for r in results}
    comparisons = {r.name: compare(r, base).to_dict() for r in results[1:]}
    spo_cmp = comparisons[spo.name]
    report: dict[str, Any] = {
        "aesthetic_win_rate": spo_cmp["aesthetic_win_rate"],
        "aesthetic_win_rate_ci": spo_cmp["aesthetic_win_rate_ci"],
        "alignment_base": models[base.name]["alignment"],
        "alignment_spo": models[spo.name]["alignment"],
        "aesthetic_base": models[base.name]["aesthetic"],
        "aesthetic_spo": models[spo.name]["aesthetic"],
        "preference_score_base": models[base.name]["preference_score"],
        "preference_score_spo": models[spo.name]["preference_score"],
        "headline_model": spo.name,
        "seconds_total": seconds_total,
        "num_eval_images": len(base.scores.aesthetic),
        "aesthetic_metric": "mean of three exact components: lighting (coarse: evenness of the backdrop's shading), "
                            "vividness (medium: the subject's colour against a muted one) and cleanliness (fine: "
                            "no clutter on the backdrop) (spotune.toyworld.metrics)",
        "alignment_metric": "shape, shape colour and background colour all as the caption names them",
        "models": models,
        "comparisons": comparisons,
        "spm_accuracy": {"final": spm_record.get("final") or {}, "start": spm_record.get("start"),
                         "steps": spm_record.get("steps"), "source": spm_record.get("source")},
        "pickscore": pickscore_record,
        "spm_training": {"loss": spm_record.get("loss", []), "history": spm_record.get("history", {})},
        "preference_data": pairs_summary,
        "stages": stages,
        "settings": settings,
        "world": world or {},
    }
    set_total_time(report, seconds_total)
    return report


def set_total_time(report: dict[str, Any], seconds_total: float) -> None:
    """Record the demo's wall time and which of the issue's targets the numbers meet."""
    report["seconds_total"] = seconds_total
    drop = 100.0 * (report["alignment_base"] - report["alignment_spo"])
    report["targets"] = {
        "aesthetic_win_rate >= 0.65": report["aesthetic_win_rate"] >= TARGETS["aesthetic_win_rate"],
        "alignment drop <= 2 points": drop <= TARGETS["alignment_drop_points"],
        "seconds_total < 600": seconds_total < TARGETS["seconds_total"],
    }


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table (shared by the terminal and the HTML)."""
    header = ["model", "aesthetic (mean)", "aesthetic win rate vs base", "alignment", "preference score", "subject size", "training time"]
    from spotune.toyworld.methods import METHODS

    stage_of = {name: method for method, (name, _) in METHODS.items()}  # "SPO" -> "spo", ..., "LPO" -> "lpo"
    rows = []
    for name, m in report["models"].items():
        cmp = report["comparisons"].get(name)
        if cmp:
            lo, hi = cmp["aesthetic_win_rate_ci"]
            win = f"{_pct(cmp['aesthetic_win_rate'])} [{_pct(lo)}, {_pct(hi)}]"
        else:
            win = "-"
        stage = report["stages"].get(stage_of.get(name, ""), None)
        if stage is None:
            seconds = "-"
        else:
            seconds = f"{stage['build_seconds']:.0f} s" + _stage_origin(stage)
        rows.append([name, f"{m['aesthetic']:.4f}", win, _pct(m["alignment"]), f"{m['preference_score']:.3f}",
                     f"{m['subject_size']:.3f}", seconds])
    return header, rows


def _stage_origin(stage: dict[str, Any], built: bool = False) -> str:
    """`` (shipped)`` for a stage taken from the package, `` (cached)`` from the cache, else nothing; with
    ``built``, the time its build took then."""
    if not stage.get("cached"):
        return ""
    origin = "shipped with the package" if stage.get("shipped") else "cached"
    if built:
        return f" ({origin}; built in {stage['build_seconds']:.0f} s)"
    return " (shipped)" if stage.get("shipped") else " (cached)"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def world_tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the world's measured properties: layout drift and aesthetic components per
    model, the base's x0-prediction aesthetics by timestep, the SPM's accuracy against both labels, and what
    the SPM's views still show."""
    tables = []
    comps = report.get("comparisons", {})
    if comps:
        rows = []
        for name, m in report["models"].items():
            cmp = comps.get(name, {})
            rows.append([name] + [_num(m.get(f"aesthetic_{c}")) for c in ("lighting", "vividness", "cleanliness")]
                        + [_num(cmp.get("layout_drift_size"), 4), _num(cmp.get("layout_drift_position_px"), 2)])
        tables.append(("Aesthetic components (mean) and layout drift against the base (same seeds)",
                       ["model", "lighting (coarse)", "vividness (medium)", "cleanliness (fine)", "size drift", "position drift (px)"], rows))
    world = report.get("world") or {}
    x0 = world.get("x0_prediction")
    if x0:
        rows = []
        for t, row in sorted(x0["by_timestep"].items(), key=lambda kv: -int(kv[0])):
            rows.append([t] + [_num(row["mean"][m]) for m in ("aesthetic", "lighting", "vividness", "cleanliness")]
                        + [_num(row["corr_with_final"][m], 2) for m in ("aesthetic", "lighting", "vividness", "cleanliness")])
        rows.append(["final"] + [_num(x0["final"][m]) for m in ("aesthetic", "lighting", "vividness", "cleanliness")] + ["1.00"] * 4)
        tables.append(("Base model: exact aesthetic of the x0-prediction by timestep, and its correlation with the final image's",
                       ["t", "aesthetic", "lighting", "vividness", "cleanliness", "r aesthetic", "r lighting", "r vividness", "r cleanliness"], rows))
    acc = world.get("spm_accuracy_by_labels")
    if acc:
        ts = [str(t) for t in acc["timesteps"]]
        rows = [["rater's preference"] + [_pct(acc["vs_rater"].get(t)) for t in ts],
                ["aesthetic alone"] + [_pct(acc["vs_aesthetic"].get(t)) for t in ts]]
        tables.append((f"SPM pair accuracy on {acc.get('pairs')} held-out pairs by timestep (target {_pct(acc['target'])} "
                       f"at every t <= 701: {'met' if acc.get('meets_target') else 'NOT met'})", ["labels"] + [f"t={t}" for t in ts], rows))
        views = acc.get("view_readings")
        if views:
            vts = [t for t in (str(t) for t in views["timesteps"]) if t in views["by_timestep"]]
            by_t = views["by_timestep"]
            measures = list(by_t[vts[0]]["agreement"]) if vts else []
            rows = [["signal-to-noise ratio of x_t"] + ["-" if by_t[t].get("snr") is None else f"{by_t[t]['snr']:.3g}" for t in vts]]
            rows += [[m.replace("_", " ")] + [_pct(by_t[t]["agreement"].get(m)) for t in vts] for m in measures]
            rows.append(["rater's utility read from the views"] + [_pct(by_t[t]["utility_vs_rater"]) for t in vts])
            rows.append(["views where the caption is found"] + [_pct(by_t[t]["views_aligned"]) for t in vts])
            tables.append(("What the SPM's views still show: pairs whose two views the exact metrics order as the images "
                           "(50% = the attribute is gone)", ["measure"] + [f"t={t}" for t in vts], rows))
    return tables


def world_lines(report: dict[str, Any]) -> list[str]:
    """:func:`world_tables` as aligned text, and where the multi-seed answer is."""
    out: list[str] = []
    for title, header, rows in world_tables(report):
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        out += [title + ":", line(header)] + [line(r) for r in rows] + [""]
    study = (report.get("world") or {}).get("multi_seed_study")
    if study:
        out.append(f"One training seed. The multi-seed answer (3 seeds, settings chosen on validation): {study}")
    return out


def format_table(report: dict[str, Any]) -> str:
    """The terminal summary: the results table, the SPM's accuracy per timestep, and stage times."""
    header, rows = table_rows(report)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [f"Test prompts, same seeds ({report['num_eval_images']} images per model):", line(header),
           line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out += [""] + world_lines(report)
    acc = report["spm_accuracy"].get("final") or {}
    if acc:
        out.append("")
        out.append("Step-aware preference model, pair accuracy on held-out pairs by timestep: "
                   + ", ".join(f"t={t}: {_pct(a)}" for t, a in sorted(acc.items(), key=lambda kv: int(kv[0]))))
    ps = report.get("pickscore") or {}
    if "eval_accuracy_after" in ps:
        out.append(f"The world's PickScore (timestep-blind, clean images), pair accuracy on held-out pairs: "
                   f"{_pct(ps['eval_accuracy_before'])} as CLIP, {_pct(ps['eval_accuracy_after'])} fine-tuned")
    out.append("")
    out.append("Stages: " + ", ".join(
        f"{name} {s['seconds']:.0f} s" + _stage_origin(s) for name, s in report["stages"].items()))
    out.append(f"Total: {report['seconds_total']:.0f} s")
    met = report.get("targets", {})
    if met:
        out.append("Targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in met.items()))
    return "\n".join(out)


# ================================================================================================
# images and plots
# ================================================================================================
def image_grid(results: list[ModelResult], columns: int, stride: int) -> Image.Image:
    """One row per model, one column per test prompt (its first seed), images enlarged, rows labelled."""
    picks = list(range(0, len(results[0].images), stride))[:columns]
    h, w = results[0].images.shape[1:3]
    cell_h, cell_w = h * GRID_SCALE, w * GRID_SCALE
    label_w, pad = 120, 4
    canvas = Image.new("RGB", (label_w + len(picks) * (cell_w + pad), len(results) * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for row, result in enumerate(results):
        y = pad + row * (cell_h + pad)
        draw.text((6, y + cell_h // 2 - 6), result.name, fill="black")
        for col, i in enumerate(picks):
            tile = Image.fromarray(result.images[i]).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label_w + col * (cell_w + pad), y))
    return canvas


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a run logged to TensorBoard: ``{tag: [(step, value), ...]}`` (empty when none)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        return {}
    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted((run / "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(set(values)) for tag, values in out.items()}


def plot_curves(path: Path, panels: list[tuple[str, dict[str, list[tuple[int, float]]], str]]) -> bool:
    """A row of line plots; ``panels`` = [(title, {series label: [(x, y)]}, x label)]. False when nothing to plot."""
    panels = [p for p in panels if any(p[1].values())]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, series, xlabel) in zip(axes[0], panels):
        for label, points in series.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return True


def _smooth(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    if window <= 1 or len(points) <= window:
        return points
    ys = np.convolve([p[1] for p in points], np.ones(window) / window, mode="valid")
    return [(points[i + window - 1][0], float(y)) for i, y in enumerate(ys)]


def write_plots(out: Path, report: dict[str, Any], spo_runs: dict[str, Path]) -> list[str]:
    """Training-curve PNGs under ``out/plots``; returns their paths relative to ``out``."""
    written = []
    acc = report["spm_accuracy"]
    accuracy_series = {}
    for label, key in (("trained", "final"), ("before training", "start")):
        if acc.get(key):
            accuracy_series[label] = sorted((int(t), a) for t, a in acc[key].items())
    loss = [tuple(p) for p in report["spm_training"]["loss"]]
    if plot_curves(out / "plots" / "spm.png", [
        ("SPM training loss", {"loss": _smooth(loss, max(1, len(loss) // 30))}, "optimizer step"),
        ("SPM pair accuracy by timestep (held-out pairs)", accuracy_series, "timestep t"),
    ]):
        written.append("plots/spm.png")
    runs = {name: read_scalars(run) for name, run in spo_runs.items()}
    panels = []
    for tag, title in (("loss", "training loss (each method its own)"), ("score_mean", "judge score of final candidates"), ("pairs", "decisive pairs per iteration")):
        series = {name: scalars.get(tag, []) for name, scalars in runs.items()}
        panels.append((title, series, "iteration"))
    if plot_curves(out / "plots" / "spo.png", panels):
        written.append("plots/spo.png")
    return written


# ================================================================================================
# files
# ================================================================================================
def _described(name: str) -> str:
    return {"SPO": "SPO fine-tuning", "trajectory DPO": "the trajectory-level baseline", "GradSPO": "GradSPO",
            "LPO": "LPO (judged by the latent reward model)"}.get(name, name)


def write_html(out: Path, report: dict[str, Any]) -> None:
    """``out/report.html``: the table, targets, grid, SPM accuracy, training curves and stage times."""
    plots = report.get("plots", [])
    header, rows = table_rows(report)
    esc = html.escape
    table = "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"
    acc = report["spm_accuracy"].get("final") or {}
    acc_html = ""
    if acc:
        acc_html = "<table><tr><th>timestep</th>" + "".join(f"<th>{esc(t)}</th>" for t in sorted(acc, key=int)) + "</tr>"
        acc_html += "<tr><td>pair accuracy</td>" + "".join(f"<td>{_pct(acc[t])}</td>" for t in sorted(acc, key=int)) + "</tr></table>"
    stages = "".join(
        f"<li>{esc(name)}: {s['seconds']:.0f} s{_stage_origin(s, built=True)}</li>"
        for name, s in report["stages"].items())
    targets = "".join(f"<li>{esc(k)}: {'met' if v else '<b>not met</b>'}</li>" for k, v in report["targets"].items())
    data = report["preference_data"]
    plots_html = "".join(f'<p><img src="{esc(p)}" alt="{esc(p)}"></p>' for p in plots)
    world_html = "".join(
        f"<h3>{esc(title)}</h3><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"
        for title, header, rows in world_tables(report))
    study = (report.get("world") or {}).get("multi_seed_study")
    if study:
        world_html += f"<p>One training seed. The multi-seed answer (3 seeds, settings chosen on validation): <code>{esc(study)}</code></p>"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>spotune demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
img{{max-width:100%;image-rendering:pixelated}}code{{background:#f4f4f4}}</style></head><body>
<h1>spotune demo: SPO in the miniature world</h1>
<p>Base model vs {esc(' vs '.join(_described(n) for n in list(report['models'])[1:]))} on
{len(set(report.get('eval_prompts', []))) or 'the'} test prompts, {report['num_eval_images']} images per model, the same seeds
for every model. Aesthetic: {esc(report['aesthetic_metric'])}. Alignment: {esc(report['alignment_metric'])}.</p>
<h2>Results</h2>{table}
<ul>{targets}</ul>
<h2>Same seeds, base and fine-tuned</h2><p><img src="grid.png" alt="grid"></p>
<h2>The world's measured properties</h2>{world_html}
<h2>Step-aware preference model</h2>
<p>{esc(str(report['spm_accuracy'].get('source') or ''))}. Trained with <code>spotune train-spm</code> for
{report['spm_accuracy'].get('steps')} steps on {data.get('train_pairs', '?')} generic preference pairs of base-model samples
(labels prefer the more aesthetic image in {_pct(data.get('train_label_agrees_with_aesthetics'))} of pairs; the rest follow
layout, alignment and rater noise). Pair accuracy on held-out pairs, labelled by the rater's noise-free preference,
by the timestep of the noisy view:</p>{acc_html}
<h2>Training curves</h2>{plots_html}
<h2>Stages</h2><ul>{stages}</ul><p>Total: {report['seconds_total']:.0f} s.</p>
</body></html>
"""
    atomic_write_text(out / "report.html", page)


def write_figures(out: Path, report: dict[str, Any], results: list[ModelResult],
                  spo_runs: dict[str, Path], grid_columns: int) -> None:
    """grid.png, plots/ and the trained LoRAs as webui/kohya files into ``out``; plot paths go to ``report["plots"]``."""
    per_prompt = int(report["settings"].get("eval_seeds_per_prompt", 1))
    _save_png(image_grid(results, grid_columns, per_prompt), out / "grid.png")
    report["plots"] = write_plots(out, report, spo_runs)
    report["loras"] = write_webui_loras(out, spo_runs)


def write_webui_loras(out: Path, runs: dict[str, Path]) -> dict[str, str]:
    """Each run's final LoRA as ``<method>_lora.safetensors``, the file webui, ComfyUI and kohya load.

    Returns:
        report name -> file name, for the runs that trained a LoRA.
    """
    from spotune.export.lora_files import webui_lora_file
    from spotune.export.source import read_export_source
    from spotune.utils.io import atomic_save_safetensors

    written: dict[str, str] = {}
    for name, run in runs.items():
        source = read_export_source(run)
        if source.lora is None:
            continue
        tensors, metadata = webui_lora_file(source.lora, title=f"spotune demo {name}", description=source.description,
                                            resolution=source.resolution, base_model=source.base_model)
        target = out / f"{name.split()[0].lower()}_lora.safetensors"
        atomic_save_safetensors(tensors, target, metadata)
        written[name] = target.name
    return written
