"""train-spm and eval-spm end to end on the tiny models and a tiny synthetic Pick-a-Pic parquet."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spotune.cli import main
from spotune.config import load_config
from spotune.data.pickapic import collate_pairs, synthetic_pairs, write_pairs_parquet
from spotune.recipes.train_spm import SPMTrainer, TrainSPMConfig

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny_spm.yaml")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These models are tiny: one thread is as fast alone and far faster when other jobs share the
    cores (an OpenMP region waits for every thread, and a descheduled one costs a whole time slice)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    return write_pairs_parquet(folder / "train.parquet", *synthetic_pairs(8, 32, seed=0))


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval-pairs")
    return write_pairs_parquet(folder / "eval.parquet", *synthetic_pairs(4, 32, seed=1))


def _args(run: Path, train: Path, *extra: str) -> list[str]:
    # guidance 1 halves the UNet work of the views; everything else is configs/tiny_spm.yaml
    return ["--config", CONFIG, f"output_dir={run}", f"train_data={train}", "guidance_scale=1.0",
            "progress=false", "log_with=none", *extra]


def _adaln(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if "adaLN_modulation" in k or "t_embedder" in k}


def test_training_lowers_the_loss_and_moves_the_time_conditioning(pairs_file, tmp_path):
    config = load_config(TrainSPMConfig, CONFIG, _args(tmp_path / "run", pairs_file, "max_steps=4", "checkpoint_every=2")[2:])
    trainer = SPMTrainer(config)
    trainer.setup()
    try:
        start = {k: v.clone() for k, v in _adaln(trainer.unwrapped.state_dict()).items()}
        batch = collate_pairs([trainer.train_set[i] for i in range(8)])

        @torch.no_grad()
        def objective() -> float:
            """The training loss on all 8 pairs, averaged over 4 seeded draws of t and noise (the same
            draws before and after: micro-batch indices the run itself never reaches)."""
            return sum(float(trainer.training_loss(batch, 10_000 + i)[0]) for i in range(4)) / 4

        before = objective()
        metrics = trainer.train()
        after = objective()
    finally:
        trainer.cleanup()
    assert after < before - 0.03, (before, after)
    assert metrics["train/lr"] == 1e-4 and trainer.global_step == 4 and trainer.micro_step == 4
    names = [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())]
    assert names == ["iter-00000002", "iter-00000004"]
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "iter-00000004" / "spm.safetensors"))
    moved = [k for k, v in _adaln(saved).items() if not torch.equal(v, start[k])]
    assert any(k.endswith("adaLN_modulation.1.weight") for k in moved)
    assert not any(v.any() for k, v in start.items() if k.endswith("adaLN_modulation.1.weight"))  # they were zero


def test_cli_run_evaluates_checkpoints_and_resumes_exactly_after_a_sigterm(pairs_file, eval_file, tmp_path, capsys, sigterm_during):
    # 4 pairs per batch: two micro-batches per epoch, so the resume below starts in mid-epoch.
    common = [f"eval_data={eval_file}", "eval_every=3", "checkpoint_every=1", "train_batch_size=4"]
    assert main(["train-spm", *_args(tmp_path / "a", pairs_file, "max_steps=3", *common, "log_with=tensorboard")]) == 0
    assert "done:" in capsys.readouterr().out
    assert list((tmp_path / "a" / "logs").rglob("events.out.tfevents.*"))  # TensorBoard by default

    def table(run: Path) -> list[dict[str, str]]:
        with open(run / "eval" / "accuracy.csv", newline="") as fh:
            return list(csv.DictReader(fh))

    rows = table(tmp_path / "a")
    assert [(r["step"], r["timestep"]) for r in rows] == [("3", t) for t in ("0", "251", "501", "701", "951")]
    assert all(r["total"] == rows[0]["total"] != "0" and int(r["correct"]) <= int(r["total"]) for r in rows)

    # A SIGTERM during step 1 (no checkpoint due): the step is finished and checkpointed, exit 143; the
    # resume to 3 starts in mid-epoch and gives the same weights and the same evaluation, bit for bit.
    sigterm_during(SPMTrainer, "training_loss", lambda trainer: trainer.micro_step == 0)
    b_args = [*common[:-2], "checkpoint_every=0", "train_batch_size=4"]
    assert main(["train-spm", *_args(tmp_path / "b", pairs_file, "max_steps=3", *b_args)]) == 143
    assert "preempted (SIGTERM) at optimizer step 1; checkpoint " in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["iter-00000001"]
    assert main(["train-spm", *_args(tmp_path / "b", pairs_file, "max_steps=3", "resume=latest", *b_args)]) == 0
    final_a = load_file(str(tmp_path / "a" / "checkpoints" / "iter-00000003" / "spm.safetensors"))
    final_b = load_file(str(tmp_path / "b" / "checkpoints" / "iter-00000003" / "spm.safetensors"))
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert table(tmp_path / "b") == rows

    # eval-spm measures the trained judge from its run folder; the table has all five timesteps.
    out = tmp_path / "acc.csv"
    eval_args = ["eval-spm", "judge=tiny-spm", f"judge_checkpoint={tmp_path / 'a'}", f"data={eval_file}",
                 "guidance_scale=1.0", "batch_size=4", "num_workers=0", "progress=false", f"output={out}"]
    assert main(eval_args) == 0
    printed = capsys.readouterr().out
    assert all(f"| {t} |" in printed for t in (0, 251, 501, 701, 951))
    with open(out, newline="") as fh:
        measured = list(csv.DictReader(fh))
    assert [r["timestep"] for r in measured] == ["0", "251", "501", "701", "951"]
    # At t = 0 no noise is involved: the same judge on the same clean pairs counts the same.
    assert (measured[0]["correct"], measured[0]["total"]) == (rows[0]["correct"], rows[0]["total"])
    assert main(eval_args) == 1  # refuses to overwrite the table
    assert "already exists" in capsys.readouterr().err


def test_bad_input_is_one_line_and_writes_nothing(pairs_file, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = tmp_path / "run"
    no_column = tmp_path / "no_caption.parquet"
    pq.write_table(pq.read_table(pairs_file).drop_columns(["caption"]), no_column)
    assert main(["train-spm", *_args(run, no_column)]) == 1
    err = capsys.readouterr().err.strip()
    assert "no_caption.parquet: missing column(s) ['caption']" in err and "\n" not in err
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()

    # An image that does not decode stops the run at its batch, naming the file, row and column.
    table = pq.read_table(pairs_file)
    cells = table.column("jpg_1").to_pylist()
    cells[5] = b"not an image"
    broken = tmp_path / "broken.parquet"
    pq.write_table(table.set_column(2, "jpg_1", pa.array(cells, pa.binary())), broken)
    assert main(["train-spm", *_args(tmp_path / "broken-run", broken, "train_batch_size=8")]) == 1
    err = capsys.readouterr().err.strip()
    assert "broken.parquet row 5, column jpg_1: image does not decode" in err and "\n" not in err
    assert not (tmp_path / "broken-run" / "checkpoints").exists()

    assert main(["train-spm", "--config", CONFIG, f"output_dir={run}"]) == 1
    assert "train_data must name" in capsys.readouterr().err

    assert main(["train-spm", *_args(run, pairs_file, "clip_path=/no/such/clip")]) == 1
    assert "/no/such/clip does not exist" in capsys.readouterr().err

    # A folder holding a run is neither reused nor deleted without resume or overwrite.
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("kept: true\n")
    assert main(["train-spm", *_args(run, pairs_file)]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == "kept: true\n"


# -- the run folder: checkpoint before evaluating, evaluation data checked first, lock, resume ----


def test_a_failing_evaluation_keeps_the_checkpoint_of_its_step(pairs_file, eval_file, tmp_path, monkeypatch, capsys):
    from spotune.checkpoint import list_checkpoints, read_state
    from spotune.errors import SpotuneError

    real = SPMTrainer.evaluate

    def failing(self):
        if self.global_step == 2:
            raise SpotuneError("evaluation failed")
        return real(self)

    monkeypatch.setattr(SPMTrainer, "evaluate", failing)
    run = tmp_path / "run"
    args = _args(run, pairs_file, "max_steps=4", "checkpoint_every=2", "eval_every=2", f"eval_data={eval_file}",
                 "train_batch_size=4", "eval_at_start=false")
    assert main(["train-spm", *args]) == 1
    assert "evaluation failed" in capsys.readouterr().err
    assert [c.name for c in list_checkpoints(run)] == ["iter-00000002"]  # the two steps are kept
    monkeypatch.setattr(SPMTrainer, "evaluate", real)
    assert main(["train-spm", *args, "resume=latest"]) == 0
    final = list_checkpoints(run)[-1]
    assert final.name == "iter-00000004"
    assert {e["step"] for e in read_state(final)["eval"]} == {4}  # the evaluation is recorded in its checkpoint


def test_bad_evaluation_data_is_found_when_the_run_starts(pairs_file, eval_file, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(eval_file)
    cells = table.column("jpg_0").to_pylist()
    cells[-1] = b"not an image"
    broken = tmp_path / "broken-eval.parquet"
    pq.write_table(table.set_column(table.column_names.index("jpg_0"), "jpg_0", pa.array(cells, pa.binary())), broken)
    run = tmp_path / "run"
    assert main(["train-spm", *_args(run, pairs_file, f"eval_data={broken}", "eval_at_start=false")]) == 1
    err = capsys.readouterr().err.strip()
    assert f"broken-eval.parquet row {len(cells) - 1}, column jpg_0: image does not decode" in err and "\n" not in err
    assert not (run / "checkpoints").exists()


def test_train_spm_refuses_a_locked_folder(pairs_file, tmp_path, capsys):
    import os

    from spotune.utils.run_lock import RunLock

    lock = RunLock(tmp_path / "run", "spotune train-spm")
    try:
        assert main(["train-spm", *_args(tmp_path / "run", pairs_file)]) == 1
        assert f"in use by process {os.getpid()}" in capsys.readouterr().err
    finally:
        lock.release()


def test_resume_refuses_a_new_seed_and_applies_a_new_learning_rate(pairs_file, tmp_path, capsys):
    import json

    import yaml

    from spotune.checkpoint import list_checkpoints

    run = tmp_path / "run"
    assert main(["train-spm", *_args(run, pairs_file, "max_steps=1")]) == 0
    started = (run / "config.yaml").read_bytes()
    assert main(["train-spm", *_args(run, pairs_file, "max_steps=2", "resume=latest", "seed=3", "guidance_scale=2.0")]) == 1
    err = capsys.readouterr().err
    assert "seed: 42 -> 3" in err and "guidance_scale: 1.0 -> 2.0" in err
    assert main(["train-spm", *_args(run, pairs_file, "max_steps=2", "resume=latest", "learning_rate=0.5")]) == 0
    last = list_checkpoints(run)[-1]
    assert last.name == "iter-00000002"
    assert [g["lr"] for g in json.loads((last / "optimizer.json").read_text())["param_groups"]] == [0.5]
    assert (run / "config.yaml").read_bytes() == started
    assert yaml.safe_load((run / "config.resumed-00000001.yaml").read_text())["learning_rate"] == 0.5
    assert main(["train-spm", *_args(run, pairs_file, "max_steps=1", "resume=latest", "learning_rate=0.5")]) == 1
    assert "raise max_steps above 2" in capsys.readouterr().err
