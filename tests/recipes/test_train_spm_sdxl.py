"""train-spm and eval-spm on the tiny SDXL model with PickScore's labels (SPO's SDXL step-aware model recipe)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from spotune.cli import main
from spotune.config import load_config
from spotune.data.pickapic import synthetic_pairs, write_pairs_parquet
from spotune.preference.clip_judge import PickScoreJudge
from spotune.preference.loading import BUILTIN_TINY_CLIP
from spotune.preference.relabel import PickScoreRelabeller, pickscore_labels
from spotune.recipes.train_spm import RELABEL_FILE, SPMTrainer, TrainSPMConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny_spm.yaml")
MARGIN = 0.01  # the tiny random CLIP's scores lie close together: a small margin leaves decisive pairs


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("sdxl-pairs")
    return (write_pairs_parquet(folder / "train.parquet", *synthetic_pairs(8, 32, seed=0)),
            write_pairs_parquet(folder / "eval.parquet", *synthetic_pairs(4, 32, seed=1)))


def _pickscore_labels(path: Path) -> list[tuple[float, float]]:
    """PickScore's labels of the pairs in ``path``, computed here from the tiny CLIP's scores."""
    import pyarrow.parquet as pq
    import io

    table = pq.read_table(path).to_pydict()
    judge = PickScoreJudge.from_pretrained(BUILTIN_TINY_CLIP)
    pixels = PickScoreRelabeller(judge).pixels
    images = lambda column: torch.stack([pixels(Image.open(io.BytesIO(b)).convert("RGB")) for b in table[column]])  # noqa: E731
    s0 = judge.score_pixel_values(images("jpg_0"), table["caption"])
    s1 = judge.score_pixel_values(images("jpg_1"), table["caption"])
    return [tuple(r) for r in pickscore_labels(s0, s1, MARGIN).tolist()]


def _args(run: Path, train: Path, *extra: str) -> list[str]:
    return ["--config", CONFIG, f"output_dir={run}", f"train_data={train}", "pretrained_model=builtin:tiny-sdxl",
            "relabel_with=pickscore", f"relabel_tie_margin={MARGIN}", "relabel_clip_path=builtin:tiny-clip",
            "guidance_scale=5.0", "progress=false", "log_with=none", *extra]


def test_cli_trains_on_pickscores_labels_and_resumes_exactly(data, tmp_path, capsys):
    train, evaluation = data
    common = [f"eval_data={evaluation}", "eval_every=3", "checkpoint_every=1", "train_batch_size=4", "eval_at_start=false"]
    assert main(["train-spm", *_args(tmp_path / "a", train, "max_steps=3", *common)]) == 0
    assert "done:" in capsys.readouterr().out

    # The checkpoint keeps PickScore's labels of every training pair seen (3 steps of 4 out of 8: all of them).
    labels = load_file(str(tmp_path / "a" / "checkpoints" / "iter-00000003" / RELABEL_FILE))["labels"]
    expected = _pickscore_labels(train)
    assert [tuple(r) for r in labels.tolist()] == expected
    assert len(set(expected)) > 1
    first = load_file(str(tmp_path / "a" / "checkpoints" / "iter-00000001" / RELABEL_FILE))["labels"]
    assert int((~torch.isnan(first[:, 0])).sum()) == 4  # one micro-batch of 4 pairs after step 1

    # The evaluation counts PickScore's decisive pairs and ties, not the data's.
    with open(tmp_path / "a" / "eval" / "accuracy.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    eval_labels = _pickscore_labels(evaluation)
    ties = sum(a == b for a, b in eval_labels)
    assert [r["timestep"] for r in rows] == ["0", "251", "501", "701", "951"]
    assert all((int(r["total"]), int(r["ties"])) == (len(eval_labels) - ties, ties) for r in rows)

    # Stopped after step 1 and resumed to 3: the same weights and evaluation, bit for bit.
    assert main(["train-spm", *_args(tmp_path / "b", train, "max_steps=1", *common)]) == 0
    assert main(["train-spm", *_args(tmp_path / "b", train, "max_steps=3", "resume=latest", *common)]) == 0
    final_a = load_file(str(tmp_path / "a" / "checkpoints" / "iter-00000003" / "spm.safetensors"))
    final_b = load_file(str(tmp_path / "b" / "checkpoints" / "iter-00000003" / "spm.safetensors"))
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    with open(tmp_path / "b" / "eval" / "accuracy.csv", newline="") as fh:
        assert [r for r in csv.DictReader(fh) if r["step"] == "3"] == rows

    # The SPM trained on SDXL views is an SPO judge like the SD1.5 one, from the run or as an official .bin.
    from spotune.preference.factory import build_judge

    judge = build_judge("tiny-spm", checkpoint=str(tmp_path / "a"))
    official = tmp_path / "sdxl_step-aware_preference_model.bin"
    torch.save(dict(final_a), official)
    again = build_judge("tiny-spm", checkpoint=str(official))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = torch.tensor([0, 700])
    assert torch.equal(judge.score(images, ["a red circle"] * 2, t), again.score(images, ["a red circle"] * 2, t))
    assert all(torch.equal(v, final_a[k]) for k, v in again.state_dict().items())


def test_views_are_sdxl_at_the_runs_resolution_and_the_labels_replace_the_datas(data, tmp_path):
    train, _ = data
    config = load_config(TrainSPMConfig, CONFIG, _args(tmp_path / "run", train, "max_steps=1")[2:])
    trainer = SPMTrainer(config)
    trainer.setup()
    try:
        assert trainer.views.family.name == "sdxl"
        assert trainer.views.conditioner.time_ids(1, torch.float32, "cpu").tolist() == [[32, 32, 0, 0, 32, 32]]
        assert not any(p.requires_grad for m in trainer.views.conditioner.text_encoders for p in m.parameters())
        seen = []
        original = trainer.training_loss.__func__

        from spotune.data.pickapic import collate_pairs
        import spotune.recipes.train_spm as recipe

        def spy(*args, **kwargs):
            seen.append((args[4].clone(), args[5].clone()))  # label_0, label_1 given to the loss
            return real(*args, **kwargs)

        real, recipe.spm_pair_loss = recipe.spm_pair_loss, spy
        try:
            original(trainer, collate_pairs([trainer.train_set[i] for i in range(8)]), 0)
        finally:
            recipe.spm_pair_loss = real
    finally:
        trainer.cleanup()
    (label_0, label_1), = seen
    assert list(zip(label_0.tolist(), label_1.tolist())) == _pickscore_labels(train)
    assert list(zip(label_0.tolist(), label_1.tolist())) != [tuple(r) for r in trainer.train_set.labels.tolist()]


def test_eval_spm_on_sdxl_against_pickscores_labels(data, tmp_path, capsys):
    _, evaluation = data
    out = tmp_path / "acc.json"
    args = ["eval-spm", "judge=tiny-spm", "pretrained_model=builtin:tiny-sdxl", f"data={evaluation}", "batch_size=2",
            "num_workers=0", "progress=false", "relabel_with=pickscore", "relabel_clip_path=builtin:tiny-clip",
            f"relabel_tie_margin={MARGIN}", f"output={out}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert all(f"| {t} |" in printed for t in (0, 251, 501, 701, 951))
    result = json.loads(out.read_text())
    labels = _pickscore_labels(evaluation)
    ties = sum(a == b for a, b in labels)
    assert result["labels"] == "pickscore" and result["ties"] == ties
    assert all((r["total"], r["ties"]) == (len(labels) - ties, ties) for r in result["rows"])
    # With the data's own labels instead, the counts are the data's.
    assert main([*args[:-5], f"output={tmp_path / 'own.json'}"]) == 0
    own = json.loads((tmp_path / "own.json").read_text())
    assert own["labels"] == "none" and own["ties"] == sum(l[0] == l[1] for l in synthetic_pairs(4, 32, seed=1)[3])


def test_bad_relabel_settings_are_one_line(data, tmp_path, capsys):
    train, evaluation = data
    assert main(["train-spm", *_args(tmp_path / "run", train, "relabel_tie_margin=1.5")]) == 1
    err = capsys.readouterr().err.strip()
    assert "relabel_tie_margin must be in [0, 1)" in err and "\n" not in err
    assert main(["train-spm", *_args(tmp_path / "run", train, "relabel_with=humans")]) != 0
    assert "relabel_with" in capsys.readouterr().err
    assert main(["train-spm", *_args(tmp_path / "run", train, "relabel_clip_path=/no/such/pickscore")]) == 1
    err = capsys.readouterr().err.strip()
    assert "/no/such/pickscore does not exist" in err and "\n" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    # eval-spm with a judge that names no CLIP folder needs the relabelling model named.
    assert main(["eval-spm", "judge=tiny-spm", f"data={evaluation}", "relabel_with=pickscore"]) == 1
    assert "relabel_with=pickscore needs relabel_clip_path=PATH" in capsys.readouterr().err
