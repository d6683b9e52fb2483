"""Inline SVG charts for the run page: line charts and a heat map, no plotting library, no network.

Every value is in an SVG ``<title>``, so a browser shows it on hover; each chart also carries its data
as ``data-*`` attributes (series names, point counts), which the page's tests read.
"""

from __future__ import annotations

import html
import math

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
# Points drawn as hoverable dots up to this many per series; beyond it the line alone (a long run's
# thousands of iterations would make the page slow).
MAX_DOTS = 150


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.2e}"


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], x_label: str = "iteration",
               width: int = 380, height: int = 200) -> str:
    """An SVG line chart of ``series`` ({name: [(x, y), ...]}); non-finite points are left out. '' when empty."""
    series = {name: [(x, y) for x, y in points if math.isfinite(y)] for name, points in series.items()}
    series = {name: points for name, points in series.items() if points}
    if not series:
        return ""
    left, right, top, bottom = 52, 10, 24, 34
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    e = html.escape
    names = ",".join(series)
    parts = [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'data-title="{e(title, quote=True)}" data-series="{e(names, quote=True)}" '
        f'data-points="{sum(len(p) for p in series.values())}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{left}" y="15" font-size="12" font-weight="bold">{e(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#bbb"/>',
        f'<text x="{left - 4}" y="{top + 9}" font-size="10" text-anchor="end">{_fmt(y1)}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" font-size="10" text-anchor="end">{_fmt(y0)}</text>',
        f'<text x="{left}" y="{height - 18}" font-size="10">{_fmt(x0)}</text>',
        f'<text x="{left + plot_w}" y="{height - 18}" font-size="10" text-anchor="end">{_fmt(x1)}</text>',
        f'<text x="{left + plot_w / 2}" y="{height - 4}" font-size="10" text-anchor="middle">{e(x_label)}</text>',
    ]
    for n, (name, points) in enumerate(series.items()):
        colour = PALETTE[n % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"><title>{e(name)}</title></polyline>')
        if len(points) <= MAX_DOTS:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"><title>{e(name)}: {_fmt(y)} at {x_label} {_fmt(x)}</title></circle>'
                      for x, y in points]
        if len(series) > 1:
            lx = left + 6 + n * (plot_w // len(series))
            parts.append(f'<rect x="{lx}" y="{top + 4}" width="10" height="3" fill="{colour}"/>'
                         f'<text x="{lx + 13}" y="{top + 9}" font-size="10">{e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def heat_map(title: str, columns: list[int], rows: list[int], values: list[list[float | None]],
             column_label: str = "iteration", row_label: str = "step", width: int = 780, cell_h: int = 12) -> str:
    """An SVG heat map: ``values[c][r]`` in [0, 1] for column ``columns[c]`` and row ``rows[r]`` (white 0 -> blue 1,
    grey where None). More columns than fit are averaged into bins. '' when empty."""
    if not columns or not rows:
        return ""
    left, top, bottom = 64, 22, 30
    plot_w = width - left - 10
    bins = min(len(columns), max(1, plot_w // 4))
    edges = [round(i * len(columns) / bins) for i in range(bins + 1)]
    cell_w = plot_w / bins
    height = top + cell_h * len(rows) + bottom
    e = html.escape
    parts = [
        f'<svg class="heatmap" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'data-title="{e(title, quote=True)}" data-columns="{bins}" data-rows="{len(rows)}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{left}" y="14" font-size="12" font-weight="bold">{e(title)}</text>',
    ]
    for r, row in enumerate(rows):
        y = top + r * cell_h
        parts.append(f'<text x="{left - 4}" y="{y + cell_h - 2}" font-size="9" text-anchor="end">{e(row_label)} {row}</text>')
        for b in range(bins):
            chunk = [values[c][r] for c in range(edges[b], edges[b + 1]) if values[c][r] is not None]
            first, last = columns[edges[b]], columns[edges[b + 1] - 1]
            span = f"{column_label} {first}" if first == last else f"{column_label}s {first}-{last}"
            if chunk:
                mean = sum(chunk) / len(chunk)
                level = max(0.0, min(1.0, mean))
                fill = f"rgb({round(255 - 224 * level)},{round(255 - 159 * level)},{round(255 - 35 * level)})"
                label = f"{row_label} {row}, {span}: {_fmt(mean)}"
            else:
                fill, label = "#e4e4e4", f"{row_label} {row}, {span}: no data"
            parts.append(f'<rect x="{left + b * cell_w:.1f}" y="{y}" width="{cell_w + 0.3:.1f}" height="{cell_h}" fill="{fill}">'
                         f"<title>{e(label)}</title></rect>")
    base = top + cell_h * len(rows)
    parts.append(f'<text x="{left}" y="{base + 12}" font-size="10">{columns[0]}</text>')
    parts.append(f'<text x="{width - 10}" y="{base + 12}" font-size="10" text-anchor="end">{columns[-1]}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{base + 24}" font-size="10" text-anchor="middle">{e(column_label)} '
                 "(white 0, blue 1)</text></svg>")
    return "".join(parts)
