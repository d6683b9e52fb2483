"""eval-spm says what its numbers rest on, and with a train-spm run's seed repeats that run's evaluation."""

from __future__ import annotations

import csv
from pathlib import Path

from spotune.cli import main
from spotune.data.pickapic import synthetic_pairs, write_pairs_parquet

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny_spm.yaml")


def _rows(file: Path) -> list[tuple[str, str, str]]:
    with open(file, newline="") as fh:
        return [(r["timestep"], r["correct"], r["total"]) for r in csv.DictReader(fh)]


def test_eval_spm_with_the_run_seed_repeats_the_run_evaluation(tmp_path, capsys):
    train = write_pairs_parquet(tmp_path / "train.parquet", *synthetic_pairs(8, 32, seed=0))
    held_out = write_pairs_parquet(tmp_path / "eval.parquet", *synthetic_pairs(6, 32, seed=1))
    run = tmp_path / "run"
    assert main(["train-spm", "--config", CONFIG, f"output_dir={run}", f"train_data={train}", f"eval_data={held_out}",
                 "max_steps=1", "seed=42", "eval_batch_size=4", "guidance_scale=1.0", "progress=false",
                 "log_with=none"]) == 0
    capsys.readouterr()
    out = tmp_path / "acc.csv"
    assert main(["eval-spm", "judge=tiny-spm", f"judge_checkpoint={run}", f"data={held_out}", "seed=42",
                 "batch_size=4", "guidance_scale=1.0", "num_workers=0", "progress=false", f"output={out}"]) == 0
    printed = capsys.readouterr().out
    measured = _rows(out)
    assert measured == _rows(run / "eval" / "accuracy.csv")  # every timestep, noisy views included
    assert f"measured on {measured[0][2]} decisive pair(s) (ties left out) of {held_out} with noise seed 42" in printed
