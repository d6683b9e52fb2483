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
