"""The world's measured properties: x0-prediction aesthetics along the base model's trajectories, and
aesthetic-only labels for the SPM's accuracy."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from spotune.toyworld.demo import resource_dir
from spotune.toyworld.preferences import RaterWeights, label_pairs
from spotune.toyworld.properties import X0_TIMESTEPS, write_aesthetic_labels, x0_prediction_aesthetics
from spotune.toyworld.render import Scene, render
from spotune.toyworld.world import all_prompts


def test_x0_prediction_aesthetics_cover_the_wanted_steps_and_end_at_the_final_images():
    from spotune.models import load_pipeline
    from spotune.toyworld.metrics import score_images
    from spotune.toyworld.render import to_uint8
    from spotune.toyworld.sampling import generate_with_pipeline

    pipe = load_pipeline(str(resource_dir() / "base"))
    captions = [p.caption for p in all_prompts()[:6]]
    seeds = list(range(6))
    out = x0_prediction_aesthetics(pipe, captions, seeds)
    assert sorted(out["by_timestep"], key=int) == sorted(str(t) for t in X0_TIMESTEPS)  # 20-step DDIM has them all
    final = score_images(to_uint8(generate_with_pipeline(pipe, captions, seeds)), captions)
    assert out["final"]["aesthetic"] == pytest.approx(float(final.aesthetic.mean()))  # the same trajectories
    for row in out["by_timestep"].values():
        assert all(0.0 <= v <= 1.0 for v in row["mean"].values())
        assert all(r is None or -1.0 <= r <= 1.0 for r in row["corr_with_final"].values())
    # The demo records them while it evaluates the base model instead of rendering the trajectories again.
    from spotune.preference.factory import build_judge
    from spotune.toyworld.evaluate import EvaluationSet, evaluate_model
    from spotune.toyworld.properties import X0Recorder

    recorder = X0Recorder(pipe.scheduler, pipe.vae, 20)
    judge = build_judge("spm", clip_path=str(resource_dir() / "pickscore"),
                        checkpoint=str(resource_dir() / "spm" / "spm.safetensors"))
    base = evaluate_model("base", pipe.unet, pipe, judge, EvaluationSet(captions, seeds), on_x0_prediction=recorder)
    assert recorder.summary(base.images, captions) == out
    few = x0_prediction_aesthetics(pipe, captions[:2], seeds[:2], num_inference_steps=4)
    assert len(few["by_timestep"]) <= len(X0_TIMESTEPS)  # the nearest of 4 steps stand in
    with pytest.raises(ValueError, match="captions"):
        x0_prediction_aesthetics(pipe, captions, seeds[:2])


def test_aesthetic_labels_prefer_the_more_aesthetic_image_and_tie_equal_ones(tmp_path):
    prompts = all_prompts()[:6]
    images = []
    for i, p in enumerate(prompts):
        plain = render(Scene(p, 16, 16, 8.0))
        muted = render(Scene(p, 16, 16, 10.0, mute=0.3))  # bigger but muted: layout and aesthetics disagree
        images.append(np.stack([plain, plain] if i == 0 else ([muted, plain] if i % 2 else [plain, muted])))
    data = label_pairs([p.caption for p in prompts], np.stack(images), RaterWeights(aesthetic=0.0, layout=1.0, alignment=0.0), rng=None)
    data.write(tmp_path / "eval.parquet")
    out = write_aesthetic_labels(tmp_path / "eval.parquet", tmp_path / "aes" / "eval.parquet")
    table = pq.read_table(str(out)).to_pydict()
    assert table["label_0"][0] == table["label_1"][0] == 0.5  # identical images: a tie
    for i in range(1, 6):
        better_first = table["aesthetic_0"][i] > table["aesthetic_1"][i]
        assert table["label_0"][i] == float(better_first) and table["label_1"][i] == float(not better_first)
    original = pq.read_table(str(tmp_path / "eval.parquet")).to_pydict()
    assert original["jpg_0"] == table["jpg_0"] and original["caption"] == table["caption"]
    assert any(original["label_0"][i] != table["label_0"][i] for i in range(1, 6))  # the layout rater disagreed
    bad = tmp_path / "bad.parquet"
    pq.write_table(pq.read_table(str(out)).drop(["aesthetic_0", "aesthetic_1"]), bad)
    with pytest.raises(ValueError, match="aesthetic_0"):
        write_aesthetic_labels(bad, tmp_path / "x.parquet")


def test_ordering_agreement_leaves_out_tied_images_and_counts_tied_views_half():
    from spotune.toyworld.properties import _ordering_agreement

    truth = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.9]])
    views = np.array([[0.9, 0.1], [0.3, 0.3], [0.0, 1.0], [0.8, 0.1]])
    share, counted = _ordering_agreement(views, truth)
    assert counted == 3  # the tied pair (row 2) is left out
    assert share == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert _ordering_agreement(views[2:3], truth[2:3]) == (None, 0)


def test_view_readings_see_clear_differences_at_t0_and_use_the_labels_scale(tmp_path):
    """Pairs that differ clearly in size, centring and each aesthetic attribute: the views of t = 0 keep every
    ordering; the report has every measure at every timestep; the scale is the pairs' own when they
    carry no summary.json, and summary.json's when they do."""
    import json
    from dataclasses import asdict

    from spotune.toyworld.properties import VIEW_MEASURES, spm_view_readings
    from spotune.toyworld.render import Blotch, Speck

    prompts = [p for p in all_prompts() if p.background in ("blue", "green") and p.colour in ("red", "yellow")][:8]
    images = []
    for i, p in enumerate(prompts):
        good = render(Scene(p, 16, 16, 9.5))
        bad = render(Scene(p, 13, 18, 6.5, mute=0.35, blotches=(Blotch(4, 4, 4.0, 0.22),),
                           specks=(Speck(26, 26, 4, "white"),)))
        images.append(np.stack([good, bad] if i % 2 == 0 else [bad, good]))
    data = label_pairs([p.caption for p in prompts], np.stack(images), RaterWeights(), rng=None)
    data.write(tmp_path / "eval.parquet")
    base = resource_dir() / "base"
    out = spm_view_readings(base, tmp_path / "eval.parquet", timesteps=(0, 951), batch_size=8)
    assert out["pairs"] == 8 and out["scale_from"] == "these pairs' images"
    assert sorted(out["by_timestep"]) == ["0", "951"]
    for row in out["by_timestep"].values():
        assert set(row["agreement"]) == set(VIEW_MEASURES)
        assert all(v is None or 0.0 <= v <= 1.0 for v in row["agreement"].values())
        assert 0.0 <= row["utility_vs_rater"] <= 1.0 and 0.0 <= row["views_aligned"] <= 1.0
    clear = out["by_timestep"]["0"]
    assert all(clear["agreement"][m] >= 0.875 for m in VIEW_MEASURES), clear
    assert clear["utility_vs_rater"] >= 0.875 and clear["views_aligned"] >= 0.875
    (tmp_path / "summary.json").write_text(json.dumps({"scale": asdict(data.scale), "rater": asdict(RaterWeights())}))
    again = spm_view_readings(base, tmp_path / "eval.parquet", timesteps=(0,), batch_size=8)
    assert again["scale_from"].endswith("summary.json")
    assert again["by_timestep"]["0"] == clear  # the same seed draws the same views; the scale is the same numbers


def test_remeasure_cli_names_a_missing_folder_and_bad_timesteps_in_one_line(tmp_path, capsys):
    from spotune.toyworld.properties import main

    assert main([str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err and "eval.parquet" in err
    assert main([str(tmp_path), "--timesteps", "0,x"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--timesteps" in err and "0,251,501" in err
    assert main([str(tmp_path), "--timesteps", "1200"]) == 1
    assert "[0, 999]" in capsys.readouterr().err


def test_remeasure_write_refuses_timesteps_other_than_the_records_own(tmp_path, capsys):
    """--write stores into the shipped spm.json only what was measured at its own timesteps; nothing is touched."""
    from spotune.toyworld.properties import main

    shipped = resource_dir() / "spm" / "spm.json"
    before = shipped.read_bytes()
    prompts = all_prompts()[:2]
    images = np.stack([np.stack([render(Scene(p, 16, 16, 8.0)), render(Scene(p, 16, 16, 9.0))]) for p in prompts])
    label_pairs([p.caption for p in prompts], images, RaterWeights(), rng=None).write(tmp_path / "eval.parquet")
    assert main([str(tmp_path), "--timesteps", "0", "--write"]) == 1
    assert "--write keeps the record's own timesteps" in capsys.readouterr().err
    assert shipped.read_bytes() == before


def test_view_readings_name_a_broken_summary_or_pairs_file(tmp_path):
    from spotune.toyworld.properties import spm_view_readings

    prompts = all_prompts()[:2]
    images = np.stack([np.stack([render(Scene(p, 16, 16, 8.0)), render(Scene(p, 16, 16, 9.0))]) for p in prompts])
    data = label_pairs([p.caption for p in prompts], images, RaterWeights(), rng=None)
    data.write(tmp_path / "eval.parquet")
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="summary.json: expected JSON with 'scale' and 'rater'"):
        spm_view_readings(resource_dir() / "base", tmp_path / "eval.parquet", timesteps=(0,))
    (tmp_path / "summary.json").write_text('{"scale": {}}')
    with pytest.raises(ValueError, match="summary.json"):
        spm_view_readings(resource_dir() / "base", tmp_path / "eval.parquet", timesteps=(0,))
    (tmp_path / "summary.json").unlink()
    pq.write_table(pq.read_table(str(tmp_path / "eval.parquet")).drop(["label_0"]), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet: no label_0"):
        spm_view_readings(resource_dir() / "base", tmp_path / "bad.parquet", timesteps=(0,))
