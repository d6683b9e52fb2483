"""`spotune train-spm model=lrm`: LPO's latent reward model trained on tiny pairs, resumed bit for bit, and
loaded as LPO's judge from its run folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spotune.cli import main
from spotune.config import load_config
from spotune.data.pickapic import collate_pairs, synthetic_pairs, write_pairs_parquet
from spotune.preference.lrm import load_lrm
from spotune.recipes.train_spm import SPMTrainer, TrainSPMConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny_lrm.yaml")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("lrm-pairs")
    return (write_pairs_parquet(folder / "train.parquet", *synthetic_pairs(8, 32, seed=0)),
            write_pairs_parquet(folder / "eval.parquet", *synthetic_pairs(4, 32, seed=1)))


def _args(run: Path, pairs: tuple[Path, Path], *extra: str) -> list[str]:
    return ["train-spm", "--config", CONFIG, f"output_dir={run}", f"train_data={pairs[0]}", f"eval_data={pairs[1]}",
            "progress=false", *extra]


def test_trains_draws_from_the_grid_and_loads_as_lpos_judge(pairs, tmp_path):
    config = load_config(TrainSPMConfig, CONFIG, _args(tmp_path / "run", pairs)[3:])
    trainer = SPMTrainer(config)
    trainer.setup()
    try:
        seen = []
        views = trainer.views
        trainer.views = lambda p0, p1, captions, t, generator: (seen.append(t.clone()), views(p0, p1, captions, t, generator))[1]
        batch = collate_pairs([trainer.train_set[i] for i in range(4)])
        for step in range(6):
            trainer.training_loss(batch, 1000 + step)
        trainer.views = views
        grid = set(range(1, 952, 50))  # the 20-step DDIM grid the authors draw from
        assert {int(t) for ts in seen for t in ts} <= grid and len({int(t) for ts in seen for t in ts}) > 3
        start = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
        metrics = trainer.train()
        trained = trainer.unwrapped
        latents, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 501, 951])
        scores = trained.score(latents, ["a", "b", "c"], t)
    finally:
        trainer.cleanup()
    assert "eval/accuracy_t1" in metrics and "eval/accuracy_t951" in metrics
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "iter-00000004" / "lrm.safetensors"))
    assert set(saved) == set(start) and any(not torch.equal(saved[k], start[k]) for k in saved)
    assert not any(k.startswith("unet.up_blocks") for k in saved)  # the LRM has no up path
    loaded = load_lrm(tmp_path / "run")  # a run folder: its latest checkpoint over the base model its config names
    torch.testing.assert_close(loaded.score(latents, ["a", "b", "c"], t), scores)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(pairs, tmp_path):
    assert main(_args(tmp_path / "straight", pairs, "eval_data=null")) == 0
    assert main(_args(tmp_path / "split", pairs, "eval_data=null", "max_steps=2")) == 0
    assert main(_args(tmp_path / "split", pairs, "eval_data=null", "resume=latest")) == 0
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "iter-00000004" / "lrm.safetensors"))
    b = load_file(str(tmp_path / "split" / "checkpoints" / "iter-00000004" / "lrm.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # An SPM run's checkpoint is not resumed as an LRM.
    assert main(_args(tmp_path / "split", pairs, "eval_data=null", "resume=latest", "model=spm", "max_steps=6")) == 1


def test_the_authors_filter_the_best_copy_and_eval_lrm_agree_with_the_run(pairs, tmp_path, capsys, caplog):
    """One run with LPO's label filter and keep_best_at=1: it trains on the kept pairs only, RUN/best holds the
    weights of the first step with the run's best accuracy at t = 1, and eval-lrm measures them as the run did."""
    from spotune.data.pickapic import PickAPicPairs

    rows = PickAPicPairs(pairs[0], keep_unlabelled=True).num_file_rows
    gaps = ["1,0.3,0.1,0.1", "1,-0.6,0.1,0.1", "0,0.1,0.01,0.01", "1,0.3,-0.1,0.1"]  # kept, dropped (2), kept, dropped
    csv_file = tmp_path / "gaps.csv"
    csv_file.write_text("\ufeffdifferent_flag,aesthetic_gap,clipscore_gap,vqascore_gap\n"
                        + "".join(gaps[i % 4] + "\n" for i in range(rows)), encoding="utf-8")
    run = tmp_path / "run"
    caplog.set_level("INFO", logger="spotune.recipes.train_spm")
    assert main(_args(run, pairs, f"pair_filter_csv={csv_file}", "keep_best_at=1", "eval_every=1", "checkpoint_every=1",
                      "train_batch_size=2")) == 0
    assert "kept 4 of 8 training pairs" in caplog.text
    history = [line.split(",") for line in (run / "eval" / "accuracy.csv").read_text().splitlines()[1:]]
    at_one = [(int(r[0]), float(r[2])) for r in history if r[1] == "1"]
    best_step, best_accuracy = max(at_one, key=lambda sa: (sa[1], -sa[0]))
    import json

    best = json.loads((run / "best" / "best.json").read_text())
    assert (best["step"], best["timestep"]) == (best_step, 1) and best["accuracy"] == pytest.approx(best_accuracy)
    if best_step:  # step 0 is the untrained model, evaluated before any checkpoint
        a = load_file(str(run / "best" / "lrm.safetensors"))
        b = load_file(str(run / "checkpoints" / f"iter-{best_step:08d}" / "lrm.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    # eval-lrm on the best copy, seeded as the run's evaluation: the run's own numbers at that step.
    capsys.readouterr()
    out = tmp_path / "acc.json"
    from spotune.preference.lrm import lrm_base_model

    assert lrm_base_model(run / "best") == "builtin:tiny-sd15" and lrm_base_model("builtin:tiny-lrm-sdxl") == "builtin:tiny-sdxl"
    assert lrm_base_model(tmp_path) is None  # an authors' folder names no base: eval-lrm then asks for pretrained_model
    assert main(["eval-lrm", f"judge_checkpoint={run / 'best'}", f"data={pairs[1]}",  # the base its run names
                 "seed=42", "batch_size=4", "num_workers=0", "progress=false", f"output={out}"]) == 0
    measured = {row["timestep"]: row["accuracy"] for row in json.loads(out.read_text())["rows"]}
    assert measured == pytest.approx({int(r[1]): float(r[2]) for r in history if int(r[0]) == best_step}, abs=1e-6)
    # Shipped as the miniature world ships its LRM (fp16, the base named relative to the folder): it scores as the run.
    from spotune.toyworld.shipping import ship_lrm

    shipped = load_lrm(ship_lrm(run, None, tmp_path / "shipped"))
    latents, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 501, 951])
    torch.testing.assert_close(shipped.score(latents, ["a", "b", "c"], t), load_lrm(run).score(latents, ["a", "b", "c"], t),
                               rtol=0.02, atol=0.02)
    # Written in the authors' layout (the base's up blocks put back), it loads through their layout's loader alike.
    from spotune.preference.lrm_layout import main as write_layout

    assert write_layout([str(run / "best"), str(tmp_path / "authors")]) == 0
    assert {"unet", "text_encoder", "state_dict.pt"} <= {p.name for p in (tmp_path / "authors").iterdir()}
    torch.testing.assert_close(load_lrm(tmp_path / "authors").score(latents, ["a", "b", "c"], t),
                               load_lrm(run / "best").score(latents, ["a", "b", "c"], t))
    assert write_layout([str(run / "best"), str(tmp_path / "authors")]) == 1  # never over an existing folder
    assert main(["eval-lrm", f"data={pairs[1]}", "judge=spm"]) == 1
    assert "eval-lrm measures a latent reward model (judge=lrm), got judge=spm" in capsys.readouterr().err


def test_mpcf_rules_of_the_three_strategies(tmp_path):
    from spotune.data.pair_filter import PairFilterError, mpcf_keep

    file = tmp_path / "gaps.csv"
    file.write_text("different_flag,aesthetic_gap,clipscore_gap,vqascore_gap,extra\n"
                    "1,0.1,0.01,0.01,x\n1,-0.3,0.01,0.01,x\n1,-0.7,0.01,0.01,x\n1,0.5,0,0.01,x\n"
                    "0,0.19,0.02,0.06,x\n0,0.2,0.02,0.06,x\n0,0.1,0.02,,x\n2,0.5,0.5,0.5,x\n")
    assert mpcf_keep(file, 1).tolist() == [True, False, False, False, True, False, False, False]
    assert mpcf_keep(file, 2).tolist() == [True, True, False, False, True, False, False, False]
    assert mpcf_keep(file, 3).tolist() == [True, True, True, False, True, False, False, False]
    file.write_text("different_flag,aesthetic_gap,clip_gap\n1,0,0\n")
    with pytest.raises(PairFilterError, match="no column clipscore_gap, vqascore_gap"):
        mpcf_keep(file)


def test_text_projection_starts_from_a_clips_as_the_authors_do(pairs, tmp_path):
    from safetensors.torch import save_file

    from spotune.preference.lrm import LRMLoadError, build_tiny_lrm

    width = build_tiny_lrm().text_projection.weight.shape[0]
    clip = tmp_path / "clip"
    clip.mkdir()
    weight = torch.randn(width, width)
    save_file({"text_projection.weight": weight, "visual_projection.weight": torch.randn(width, 8)}, str(clip / "model.safetensors"))
    config = load_config(TrainSPMConfig, CONFIG, _args(tmp_path / "run", pairs, f"text_projection_from={clip}")[3:])
    trainer = SPMTrainer(config)
    trainer.setup()
    try:
        assert torch.equal(trainer.unwrapped.text_projection.weight.detach(), weight)
    finally:
        trainer.cleanup()
    save_file({"text_projection.weight": torch.randn(width + 1, width)}, str(clip / "model.safetensors"))
    with pytest.raises(LRMLoadError, match=rf"text_projection.weight is \[{width + 1}, {width}\], but this LRM's"):
        from spotune.preference.lrm import init_text_projection

        init_text_projection(build_tiny_lrm(), clip)
    with pytest.raises(LRMLoadError, match="an SDXL LRM has no text_projection"):
        init_text_projection(build_tiny_lrm(sdxl=True), clip)
