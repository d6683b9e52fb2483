"""The run page and what feeds it, on one tiny two-epoch SPO run with validation images and TensorBoard.

The run (4 prompts, 2 per round: 2 iterations per epoch, 4 in all) records sampling trees at the default
``tree_every`` (the first iteration, each iteration that ends with validation images, the last), logs
every iteration with its per-step statistics, renders the base model's grid beside each epoch's, and
writes ``report.html`` at each checkpoint. The page is then read for its numbers and rendered by a real
headless browser from its ``file://`` URL.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spotune.checkpoint import list_checkpoints
from spotune.cli import main
from spotune.recipes.run_log import METRICS_FILE, read_metrics
from spotune.utils.run_lock import RunLock
from spotune.view.run_page import build_run_page, run_is_going

from browser import find_chromium, image_status, rendered_dom, screenshot_pixels

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
STEPS, DIVERT = 8, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("view")
    prompts = folder / "prompts.json"
    prompts.write_text(json.dumps([{"caption": c} for c in ("a red circle", "a blue square", "a green circle", "a pink square")]))
    out = folder / "run"
    assert main([
        "train", "--config", str(CONFIG), f"output_dir={out}", f"prompts={prompts}", f"num_inference_steps={STEPS}",
        f"divert_start_step={DIVERT}", "sample_batch_size=2", "train_batch_size=4", "preference_threshold=0.0",
        "progress=false", "num_epochs=2", "max_iterations=null", "validate_every_epochs=1", "checkpoint_every=0",
        "log_with=tensorboard", "tree_prompt=1",
    ]) == 0
    return out


def test_validation_grids_each_epoch_beside_the_base_models(run):
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["base.png", "epoch-0001.png", "epoch-0002.png"]
    with Image.open(run / "samples" / "base.png") as base, Image.open(run / "samples" / "epoch-0002.png") as last:
        assert base.size == last.size
    assert [c.name for c in list_checkpoints(run)] == ["iter-00000002", "iter-00000004"]


def test_trees_at_the_first_iteration_each_validation_and_the_last(run):
    assert sorted(p.name for p in (run / "trees").glob("*.json")) == [f"iter-0000000{i}.json" for i in (1, 2, 4)]
    record = json.loads((run / "trees" / "iter-00000002.json").read_text())
    assert record["prompt_row"] == 1 and record["sampler"] == "spo" and record["candidates"] == 4
    assert [row["step_index"] for row in record["steps"]] == list(range(DIVERT, STEPS))


def test_metrics_log_and_tensorboard_hold_the_per_step_statistics(run):
    records = read_metrics(run)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    for r in records:
        per_step = r["per_step"]
        assert per_step["step"] == list(range(DIVERT, STEPS))
        # threshold 0 keeps every judged pair: one tuple per prompt at each step
        assert per_step["pair_rate"] == [1.0] * (STEPS - DIVERT)
        assert all(0 <= g < 1 for g in per_step["gap"]) and all(v is not None for v in per_step["log_ratio_win"])
        assert r["pairs"] == 2 * (STEPS - DIVERT)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "logs" / "spotune"), size_guidance={"images": 0, "scalars": 0})  # tracker_project
    acc.Reload()
    assert [e.step for e in acc.Images("sampling_tree")] == [1, 2, 4]
    pair_rate = acc.Scalars(f"per_step/pair_rate/step_{DIVERT:02d}")
    assert [(e.step, e.value) for e in pair_rate] == [(i, 1.0) for i in (1, 2, 3, 4)]
    gaps = acc.Scalars(f"per_step/gap/step_{STEPS - 1:02d}")
    assert [e.value for e in gaps] == pytest.approx([r["per_step"]["gap"][-1] for r in records])


def test_the_page_holds_the_runs_numbers(run, tmp_path, monkeypatch):
    html = (run / "report.html").read_text()
    assert 'content="spotune run page"' in html
    loss = re.search(r'<svg class="chart"[^>]*data-title="loss"[^>]*data-points="(\d+)"', html)
    assert loss and int(loss.group(1)) == 4
    heat = re.search(r'<svg class="heatmap"[^>]*data-title="pair rate per step[^"]*" data-columns="(\d+)" data-rows="(\d+)"', html)
    assert heat and heat.groups() == ("4", str(STEPS - DIVERT))
    first = read_metrics(run)[0]
    assert f"loss: {first['loss']:.4g} at iteration 1" in html
    for checkpoint in list_checkpoints(run):
        assert f"spotune export {checkpoint.resolve()} --format webui --output run-{checkpoint.name}.safetensors" in html
    # The first checkpoint's command works as the page prints it.
    command = re.search(r"<code>(spotune export [^<]+)</code>", html).group(1)
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(command)[1:]) == 0 and (tmp_path / "run-iter-00000002.safetensors").is_file()
    assert html.count('<img class="tree"') == 3
    assert json.loads((run / "trees" / "iter-00000001.json").read_text())["prompt"] in html


def test_the_page_renders_in_a_headless_browser(run, tmp_path):
    chromium = find_chromium()
    url = (run / "report.html").resolve().as_uri()
    html = rendered_dom(chromium, tmp_path / "profile-dom", url)
    assert re.search(r'data-script-errors="0"', html), "the page's scripts raised errors"
    loaded, total, status = image_status(html)
    # 2 epochs x (base + epoch grid) + 3 trees
    assert total == 7 and loaded == total, status
    assert 'class="broken"' not in html
    pixels = screenshot_pixels(chromium, tmp_path / "profile-shot", url, tmp_path / "page.png")
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # charts, heat maps, grids and trees drawn


def test_view_on_demand_and_on_a_run_that_is_still_going(run, tmp_path, capsys):
    # `spotune view` writes the page beside the run; pages elsewhere point their images back into the run.
    assert main(["view", str(run)]) == 0
    assert "run page: " in capsys.readouterr().out
    page = tmp_path / "elsewhere" / "page.html"
    assert main(["view", str(run), "--output", str(page)]) == 0
    sources = re.findall(r'src="([^"]+)"', page.read_text())
    assert sources and all((page.parent / s).is_file() for s in sources)
    # A run still going: its lock is held; the page says so and shows what exists (here: no log yet).
    going = tmp_path / "going"
    going.mkdir()
    (going / "config.yaml").write_text((run / "config.yaml").read_text())
    lock = RunLock(going, "spotune train")
    try:
        assert run_is_going(going)
        html = build_run_page(going)
        assert "still going" in html and "No iteration logged yet" in html and "None recorded" in html
    finally:
        lock.release()
    assert not run_is_going(going)
    # A log line cut by a crash is skipped, not an error.
    log = going / METRICS_FILE
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"iteration": 1, "loss": 0.5}) + "\n" + '{"iteration": 2, "lo')
    assert [r["iteration"] for r in read_metrics(going)] == [1]
    assert "not running" in build_run_page(going)


def test_view_refuses_what_is_not_a_run_or_not_its_page(run, tmp_path, capsys):
    assert main(["view", str(tmp_path / "missing")]) == 1
    assert "no such run folder" in capsys.readouterr().err
    assert main(["view", str(tmp_path)]) == 1
    assert "not a spotune run folder" in capsys.readouterr().err
    mine = tmp_path / "notes.html"
    mine.write_text("<p>my notes</p>")
    assert main(["view", str(run), "--output", str(mine)]) == 1
    assert "not written by spotune view" in capsys.readouterr().err and mine.read_text() == "<p>my notes</p>"
