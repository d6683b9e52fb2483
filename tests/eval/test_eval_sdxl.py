"""`spotune eval` on the tiny SDXL-architecture model: it generates from a generate config that names the
family, then scores the 1-model folder; the scores are the scorer's on those files."""

from __future__ import annotations

import csv

import pytest
import yaml
from PIL import Image

from spotune.cli import main
from spotune.eval import get_scorer
from spotune.generation.pnginfo import parse_parameters, read_parameters

PROMPTS = ["a red cat", "a blue dog"]
TINY_SCORERS = ["scorers=[pickscore]", "pickscore_model=builtin:tiny-clip"]


def test_eval_generates_sdxl_images_and_scores_them(tmp_path):
    gens, report = tmp_path / "gens", tmp_path / "report"
    gen_yaml = tmp_path / "gen.yaml"
    gen_yaml.write_text(yaml.safe_dump({
        "model": "builtin:tiny-sdxl", "model_family": "sdxl", "prompts": PROMPTS, "output_dir": str(gens),
        "steps": 2, "images_per_prompt": 2, "grid": False,
    }))
    assert main(["eval", "--generate", str(gen_yaml), "--out", str(report), "report_images=2", *TINY_SCORERS]) == 0
    with open(report / "scores.csv", newline="") as fh:
        scores = list(csv.DictReader(fh))
    assert len(scores) == 4 and {r["model"] for r in scores} == {"base"}
    images = [Image.open(r["file"]).convert("RGB") for r in scores]
    assert {im.size for im in images} == {(32, 32)}
    assert {parse_parameters(read_parameters(r["file"]))["Model family"] for r in scores} == {"sdxl"}
    again = get_scorer("pickscore", model_path="builtin:tiny-clip", device="cpu")(images, [r["prompt"] for r in scores])
    assert [float(r["pickscore"]) for r in scores] == pytest.approx(again.tolist(), abs=1e-3)
    assert (report / "report.html").is_file()


def test_eval_with_a_generate_config_of_the_wrong_family_is_one_line(tmp_path, capsys):
    gen_yaml = tmp_path / "gen.yaml"
    gen_yaml.write_text(yaml.safe_dump({
        "model": "builtin:tiny-sdxl", "model_family": "sd15", "prompts": PROMPTS, "output_dir": str(tmp_path / "g"),
    }))
    assert main(["eval", "--generate", str(gen_yaml), "--out", str(tmp_path / "r"), *TINY_SCORERS]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is an SDXL model but model_family=sd15" in err
    assert not (tmp_path / "r").exists()
