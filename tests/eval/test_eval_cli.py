"""The command line end to end: `spotune generate`, then `spotune eval --generate` on tiny models."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import stat

import pytest
import yaml
from PIL import Image

from spotune.cli import main
from spotune.eval import get_scorer
from spotune.eval.records import ImageFolderError, collect_images

PROMPTS = ["a red cat", "a blue dog"]
TINY_SCORERS = ["scorers=[pickscore,clipscore]", "pickscore_model=builtin:tiny-clip", "clipscore_model=builtin:tiny-clip"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    gens, report = root / "gens", root / "report"
    # A second model first: the same prompts and seeds at another guidance scale.
    args = ["generate", "--model", "builtin:tiny-sd15", "--out", str(gens), "name=cfg2", "guidance_scale=2.0",
            "steps=2", "images_per_prompt=2", "grid=false"]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    assert main(args) == 0
    gen_yaml = root / "gen.yaml"
    gen_yaml.write_text(yaml.safe_dump(
        {"model": "builtin:tiny-sd15", "prompts": PROMPTS, "output_dir": str(gens), "steps": 2, "images_per_prompt": 2}
    ))
    code = main(["eval", "--generate", str(gen_yaml), "--out", str(report), "baseline=base", "report_images=3", *TINY_SCORERS])
    assert code == 0
    return root, gens, report


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_eval_generates_first_and_writes_the_report(evaluated, capsys):
    root, gens, report = evaluated
    assert sorted(p.name for p in gens.iterdir()) == ["base", "cfg2", "grid.png"]
    for name in ("scores.csv", "summary.csv", "win_rates.csv", "summary.json", "report.md", "report.html",
                 "plots/scores_pickscore.png", "plots/scores_clipscore.png"):
        assert (report / name).is_file(), name
    scores = rows(report / "scores.csv")
    assert len(scores) == 8 and {r["model"] for r in scores} == {"base", "cfg2"}
    # The CSV holds what the scorer gives for those files and prompts.
    base = [r for r in scores if r["model"] == "base"]
    images = [Image.open(r["file"]).convert("RGB") for r in base]
    again = get_scorer("pickscore", model_path="builtin:tiny-clip", device="cpu")(images, [r["prompt"] for r in base])
    assert [float(r["pickscore"]) for r in base] == pytest.approx(again.tolist(), abs=1e-3)
    summary = {(r["scorer"], r["model"]): r for r in rows(report / "summary.csv")}
    assert float(summary[("pickscore", "base")]["mean"]) == pytest.approx(sum(again.tolist()) / 4, abs=1e-3)
    (clip_rates, pick_rates) = sorted(rows(report / "win_rates.csv"), key=lambda r: r["scorer"])
    assert (pick_rates["model_a"], pick_rates["model_b"], pick_rates["pairs"]) == ("cfg2", "base", "4")
    cfg2 = {r["key"]: float(r["pickscore"]) for r in scores if r["model"] == "cfg2"}
    wins = sum(cfg2[r["key"]] > float(r["pickscore"]) for r in base)
    assert float(pick_rates["a_win_rate"]) == pytest.approx(wins / 4)
    page = (report / "report.html").read_text()
    assert page.count('<tr><td class="prompt">') == 3 and len(list((report / "thumbs").rglob("*.png"))) == 6
    assert "| cfg2 | 4 |" in (report / "report.md").read_text()


def test_eval_refuses_bad_inputs(evaluated, capsys):
    root, gens, report = evaluated
    assert main(["eval", "--images", str(gens), "--out", str(report), *TINY_SCORERS]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["eval", "--images", str(gens), "--out", str(root / "r2"), "scorers=[hpsv2,aesthetic]"]) == 1
    err = capsys.readouterr().err
    assert "HPS_v2_compressed.pt" in err and "sac+logos+ava1-l14-linearMSE.pth" in err
    assert not (root / "r2").exists()
    assert main(["eval", "--images", str(gens), "--out", str(root / "r3"), "--scorers", "pickscore,nosuch"]) == 1
    assert "unknown scorer" in capsys.readouterr().err
    assert main(["eval", "--images", str(root / "missing"), "--out", str(root / "r4"), *TINY_SCORERS]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--out", str(root / "g")]) == 1
    assert "'model' is required" in capsys.readouterr().err


def _checksums(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_never_deletes_the_images_it_evaluates(evaluated, capsys):
    root, gens, report = evaluated
    before = _checksums(gens)
    for out in (gens, gens.parent, gens / "base"):  # the image folder, a folder holding it, a model folder in it
        assert main(["eval", "--images", str(gens), "--out", str(out), "overwrite=true", *TINY_SCORERS]) == 1
        err = capsys.readouterr().err
        assert "would delete those images" in err and str(gens) in err and len(err.strip().splitlines()) == 1
    assert _checksums(gens) == before


def test_overwrite_replaces_a_report_but_not_a_users_folder(evaluated, tmp_path, capsys):
    root, gens, report = evaluated
    mine = tmp_path / "mine"
    (mine / "plots").mkdir(parents=True)
    (mine / "plots" / "a.png").write_bytes(b"a report-like name")  # recognised names ...
    (mine / "thesis.tex").write_text("years of work")  # ... and one that is not spotune's
    before = _checksums(mine)
    assert main(["eval", "--images", str(gens), "--out", str(mine), "overwrite=true", *TINY_SCORERS]) == 1
    err = capsys.readouterr().err
    assert "would delete" in err and str(mine / "thesis.tex") in err and "a.png" not in err
    assert _checksums(mine) == before

    out = tmp_path / "report"
    shutil.copytree(report, out)  # an earlier spotune report (with its marker)
    (out / "scores.csv").write_text("stale")
    old = os.umask(0o022)
    try:
        assert main(["eval", "--images", str(gens), "--out", str(out), "overwrite=true", *TINY_SCORERS]) == 0
    finally:
        os.umask(old)
    assert len(rows(out / "scores.csv")) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "report"]  # no temporary or old copy left
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and stat.S_IMODE((out / "report.html").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "plots").stat().st_mode) == 0o755


def test_plain_png_folders_pair_through_their_parameters(evaluated, tmp_path):
    _, gens, _ = evaluated
    plain = tmp_path / "webui"
    shutil.copytree(gens / "base", plain, ignore=shutil.ignore_patterns("*.json", "*.jsonl"))
    models = collect_images([plain, gens / "cfg2"])
    assert list(models) == ["webui", "cfg2"]
    by_key = {i.key: i for i in models["webui"]}
    for item in models["cfg2"]:
        assert by_key[item.key].prompt == item.prompt and by_key[item.key].seed == item.seed
    Image.new("RGB", (8, 8)).save(plain / "no-parameters.png")
    with pytest.raises(ImageFolderError, match="no-parameters.png.*no 'parameters' text chunk"):
        collect_images([plain])
    with pytest.raises(ImageFolderError, match="both named 'cfg2'"):
        collect_images([gens / "cfg2", gens])


@pytest.mark.parametrize("name", ["sd15_eval", "tiny_eval"])
def test_shipped_configs_load(name):
    from pathlib import Path

    from spotune.config import load_config
    from spotune.eval.config import EvalConfig
    from spotune.generation import GenerateConfig

    root = Path(__file__).resolve().parents[2]
    config = load_config(EvalConfig, root / "configs" / f"{name}.yaml")
    generate = load_config(GenerateConfig, root / config.generate_config)
    assert generate.steps in (4, 20) and config.scorers
    if name == "sd15_eval":  # the paper's protocol
        assert (generate.steps, generate.guidance_scale, generate.eta) == (20, 5.0, 0.0)
        assert config.scorers == ["pickscore", "hpsv2", "imagereward", "aesthetic"]
