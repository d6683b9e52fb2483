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
