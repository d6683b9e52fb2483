"""The report files on hand-made scores, and the HTML page rendered by a real headless browser."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from spotune.eval.records import ImageItem
from spotune.eval.report import markdown_report, write_report
from spotune.eval.tables import build_tables

from browser import find_chromium, image_status, rendered_dom, screenshot_pixels

MODELS = ("base", "spo <new>")  # a name with HTML special characters must be escaped, not break the page
CATEGORIES = ("Animals", "Vehicles")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report of two models x 6 images (2 categories) with hand-made scores: spo wins 5 of 6 pairs."""
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    items, scores = {}, {"pickscore": {}, "aesthetic": {}}
    for m, model in enumerate(MODELS):
        folder = root / "images" / f"model{m}"
        folder.mkdir(parents=True)
        items[model] = []
        for k in range(6):
            path = folder / f"{k:05d}-000.png"
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
            items[model].append(ImageItem(model, f"{k:05d}-000", path, f"prompt {k} & <b>", 100 + k, CATEGORIES[k % 2], k, 0))
    scores["pickscore"]["base"] = [20.0, 21.0, 20.5, 19.0, 22.0, 21.0]
    scores["pickscore"]["spo <new>"] = [21.0, 22.0, 21.5, 20.0, 21.0, 23.0]
    scores["aesthetic"]["base"] = [5.0, 5.5, 5.2, 5.1, 5.3, 5.4]
    scores["aesthetic"]["spo <new>"] = [5.8, 5.9, 5.7, 6.0, 5.6, 5.9]
    tables = build_tables(items, scores)
    out = root / "report"
    page = write_report(tables, out, title="Tiny <eval>", report_images=4)
    return out, page, tables


def test_report_files_hold_the_numbers(report):
    out, page, tables = report
    with open(out / "win_rates.csv", newline="") as fh:
        rates = {r["scorer"]: r for r in csv.DictReader(fh)}
    assert rates["pickscore"]["model_a"] == "spo <new>" and rates["pickscore"]["a_wins"] == "5"
    assert float(rates["pickscore"]["a_win_rate"]) == pytest.approx(5 / 6)
    assert float(rates["aesthetic"]["a_win_rate"]) == 1.0
    with open(out / "categories.csv", newline="") as fh:
        cats = {(r["scorer"], r["model"], r["category"]): float(r["mean"]) for r in csv.DictReader(fh)}
    assert cats[("pickscore", "base", "Animals")] == pytest.approx((20.0 + 20.5 + 22.0) / 3)
    data = json.loads((out / "summary.json").read_text())
    assert {(s["scorer"], s["model"]) for s in data["summary"]} == {(s, m) for s in tables.scorers for m in MODELS}
    md = markdown_report(tables, "Tiny")
    assert re.search(r"\| spo <new> \| 6 \| 21\.417 ± \d\.\d{3} \| 5\.817 ± \d\.\d{3} \|", md)
    assert "| pickscore | spo <new> | base | 6 | 83.3% |" in md
    for name in ("scores_pickscore", "scores_aesthetic", "categories_pickscore", "categories_aesthetic"):
        with Image.open(out / "plots" / f"{name}.png") as plot:
            assert plot.width > 300 and plot.height > 200
    html = page.read_text()
    assert "spo &lt;new&gt;" in html and "<new>" not in html and "prompt 0 &amp; &lt;b&gt;" in html


def test_html_report_renders_in_a_headless_browser(report, tmp_path):
    chromium = find_chromium()
    out, page, tables = report
    url = page.resolve().as_uri()
    html = rendered_dom(chromium, tmp_path / "profile-dom", url)
    # The summary table rendered with one row per model and one column per scorer.
    table = re.search(r'<table id="summary-table">(.*?)</table>', html, re.S).group(1)
    assert table.count("<tr>") == 1 + len(MODELS) and "spo &lt;new&gt;" in table and "pickscore" in table
    # The page's own script ran after load and found every image decoded (plots and grid thumbnails).
    loaded, total, status = image_status(html)
    assert total == 4 + 4 * len(MODELS) and loaded == total, status
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', html)]
    assert len(widths) == total and min(widths) > 0
    assert 'class="broken"' not in html

    pixels = screenshot_pixels(chromium, tmp_path / "profile-shot", url, tmp_path / "report.png")
    assert pixels.shape[:2] == (2400, 1200)
    # Not a blank page: text, table borders, plots and thumbnails give many distinct colours.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000


def test_browser_shows_broken_images_when_the_report_loses_files(report, tmp_path):
    chromium = find_chromium()
    out, _, _ = report
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "thumbs")
    html = rendered_dom(chromium, tmp_path / "profile", (copy / "report.html").resolve().as_uri())
    loaded, total, status = image_status(html)
    assert (loaded, total) == (4, 4 + 4 * len(MODELS))
    assert f">{4 * len(MODELS)} of {4 + 4 * len(MODELS)} images failed to load</p>" in status
