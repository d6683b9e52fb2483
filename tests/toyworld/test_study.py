"""bench/study_world.py end to end on a shrunken budget through its CLI, and its report's consistency."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from spotune.toyworld.demo import resource_dir

RESOURCES = resource_dir()
SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "study_world.py"
pytestmark = pytest.mark.skipif(
    not (RESOURCES / "base" / "model_index.json").is_file() or not (RESOURCES / "spm" / "spm.safetensors").is_file(),
    reason="the toyworld weights are not in this checkout",
)
SHRUNK = {"num_inference_steps": 3, "divert_start_step": 1, "sample_batch_size": 2, "train_batch_size": 4,
          "preference_threshold": 0.0}  # threshold 0: a run with no optimizer step fails


def _script():
    spec = importlib.util.spec_from_file_location("study_world", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    values = yaml.safe_load((RESOURCES / "configs" / "toyworld_spo.yaml").read_text())
    (tmp / "spo.yaml").write_text(yaml.safe_dump({**values, **SHRUNK}))
    args = ["--cache-dir", str(tmp / "cache"), "--spo-config", str(tmp / "spo.yaml"), "--learning-rates", "1e-4",
            "--iterations", "2", "--checkpoint-every", "1", "--seeds", "0", "1", "--eval-seeds-per-prompt", "1",
            "--eval-inference-steps", "2", "--prompts-per-split", "2", "--resamples", "200", "--threads", "1"]
    module = _script()
    code = module.main(["--output", str(tmp / "out"), *args])
    return module, tmp / "out", code, args


def test_the_study_writes_its_report_with_every_method_in_every_table(study):
    _, out, code, _ = study
    assert code == 0
    for name in ("study.json", "study.md", "plots/win_rate.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "study.json").read_text())
    methods = ["spo", "trajectory", "gradspo"]
    assert report["settings"]["methods"] == methods  # the JSON's keys are sorted; the settings keep the order
    assert set(report["methods"]) == set(report["selection"]) == set(report["curves"]) == set(methods)
    markdown = (out / "study.md").read_text()
    for method in methods:
        assert report["methods"][method]["name"] in markdown
    assert report["splits"]["validation"] and not set(report["splits"]["validation"]) & set(report["splits"]["test"])
    assert report["splits"]["train_prompts"] == 96 and len(report["splits"]["test"]) == 2
    # Every method's aesthetic delta splits into its three components, which average to it.
    for m in report["methods"].values():
        parts = [m[f"{c}_delta"]["mean"] for c in ("lighting", "vividness", "cleanliness")]
        assert sum(parts) / 3 == pytest.approx(m["aesthetic_delta"]["mean"], abs=1e-9)
    assert "Aesthetic delta by component" in markdown
    # What the demo reads: each method's chosen settings, exactly the selection's.
    from spotune.toyworld.demo import study_choice

    chosen = study_choice(out / "study_choice.json")
    assert chosen == {m: {"learning_rate": sel["chosen"]["learning_rate"], "iterations": sel["chosen"]["iterations"]}
                      for m, sel in report["selection"].items()}


def test_intervals_contain_their_estimates_and_span_every_seed(study):
    _, out, _, _ = study
    report = json.loads((out / "study.json").read_text())
    for method, m in report["methods"].items():
        for key in ("win_rate", "preference_win_rate", "aesthetic_delta", "alignment", "layout_drift_size",
                    "layout_drift_position_px"):
            d = m[key]
            if math.isnan(d["mean"]):  # no subject in any image pair (2-step images can be blank)
                continue
            assert d["ci_low"] <= d["mean"] <= d["ci_high"], (method, key, d)
            assert d["seeds"] == 2 and len(d["seed_means"]) == 2 and d["images"] == 2, (method, key)
        for key in ("win_rate", "preference_win_rate", "alignment"):
            assert 0.0 <= m[key]["ci_low"] and m[key]["ci_high"] <= 1.0
        assert m["layout_drift_size"]["mean"] >= 0.0 and m["seeds"] == [0, 1]


def test_selection_follows_the_written_rule_and_curves_match_the_checkpoints(study):
    module, out, _, _ = study
    report = json.loads((out / "study.json").read_text())
    assert report["checkpoint_iterations"] == [1, 2]
    for method, sel in report["selection"].items():
        grid = sel["grid"]
        assert [(g["learning_rate"], g["iterations"]) for g in grid] == [(1e-4, 1), (1e-4, 2)]
        best = max(g["win_rate"] for g in grid)
        chosen = sel["chosen"]
        first_best = min(g["iterations"] for g in grid if g["win_rate"] == best)
        assert chosen["validation_win_rate"] == best and chosen["iterations"] == first_best  # ties: fewer iterations
        assert report["methods"][method]["iterations"] == chosen["iterations"]
        curve = report["curves"][method]
        assert curve["iterations"] == report["checkpoint_iterations"]
        assert len(curve["win_rate"]) == len(curve["ci_low"]) == len(curve["ci_high"]) == len(curve["iterations"])
        cost = report["methods"][method]["unet_evaluations_per_iteration"]
        assert curve["unet_evaluations"] == [it * cost for it in curve["iterations"]]
        at_chosen = curve["win_rate"][curve["iterations"].index(chosen["iterations"])]
        assert at_chosen == pytest.approx(report["methods"][method]["win_rate"]["mean"])
    # Costs from the shrunken YAML: step-wise samplers b (d + 1 + k (N - d - 1)), trajectory pairs b 2 N.
    b, n, d, k = 2, 3, 1, 4
    assert report["methods"]["spo"]["unet_evaluations_per_iteration"] == b * (d + 1 + k * (n - d - 1))
    assert report["methods"]["gradspo"]["unet_evaluations_per_iteration"] == b * (d + 1 + k * (n - d - 1))
    assert report["methods"]["trajectory"]["unet_evaluations_per_iteration"] == b * 2 * n
    # The work the run-time estimate counts is the work the run did.
    assert report["evaluated_images"] == report["planned"]["eval_images"]
    assert report["trainings_built"] == report["planned"]["trainings"] == 3 * 2  # seed 0's final run is the grid run
    assert report["estimated_seconds"]["total"] > 0 and report["seconds"]["total"] > 0


def test_tie_break_prefers_fewer_iterations_then_the_smaller_learning_rate():
    select = _script().select
    grid = [{"learning_rate": 3e-4, "iterations": 10, "win_rate": 0.7}, {"learning_rate": 1e-4, "iterations": 20, "win_rate": 0.7},
            {"learning_rate": 1e-4, "iterations": 10, "win_rate": 0.7}, {"learning_rate": 3e-5, "iterations": 30, "win_rate": 0.6}]
    assert (select(grid)["learning_rate"], select(grid)["iterations"]) == (1e-4, 10)


def test_a_used_output_is_refused_and_a_rerun_reuses_every_training(study, capsys):
    module, out, _, args = study
    before = json.loads((out / "study.json").read_text())
    assert module.main(["--output", str(out), *args]) == 1
    assert "already holds files" in capsys.readouterr().err
    assert module.main(["--output", str(out), "--overwrite", *args]) == 0
    after = json.loads((out / "study.json").read_text())
    assert all(t["cached"] for t in after["trainings"]) and after["trainings_built"] == 0
    assert after["methods"] == before["methods"]  # same cached models, same seeds: the same numbers


def test_bad_settings_are_one_line_errors_and_help_and_estimate_work(capsys):
    module = _script()
    assert module.main(["--iterations", "25", "--checkpoint-every", "10"]) == 1
    assert "--iterations (25) must be a multiple of --checkpoint-every (10)" in capsys.readouterr().err
    assert module.main(["--methods", "dpo"]) == 1
    assert module.main(["--estimate"]) == 0
    assert "estimated run time" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0


def test_the_report_names_the_world_it_studied(study):
    _, out, _, _ = study
    from spotune.toyworld.demo import digest_file, digest_files

    models = json.loads((out / "study.json").read_text())["models"]
    assert models["base_model"] == str(RESOURCES / "base") and models["base_digest"] == digest_files(RESOURCES / "base")
    assert models["spm_checkpoint"] == str(RESOURCES / "spm" / "spm.safetensors")
    assert models["spm_digest"] == digest_file(RESOURCES / "spm" / "spm.safetensors")
    assert f"base model {RESOURCES / 'base'}" in (out / "study.md").read_text()


def test_a_candidate_world_is_studied_through_its_own_folders(tmp_path, capsys):
    """--base-model / --pickscore-model / --spm-checkpoint reach the trainings and the evaluation."""
    import shutil

    module = _script()
    base, spm = tmp_path / "candidate-base", tmp_path / "candidate-spm.safetensors"
    shutil.copytree(RESOURCES / "base", base)
    shutil.copyfile(RESOURCES / "spm" / "spm.safetensors", spm)
    args = module.parse_args(["--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                              "--base-model", str(base), "--spm-checkpoint", str(spm)])
    trainer = module.Trainer(args)
    assert (trainer.base_dir, trainer.spm_path, trainer.pickscore_dir) == (base, spm, RESOURCES / "pickscore")
    # A folder that is not a base model is one line naming it, exit 1.
    assert module.main(["--output", str(tmp_path / "out2"), "--cache-dir", str(tmp_path / "cache"),
                        "--base-model", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "nothing") in err[0]


@pytest.mark.parametrize("flag, make", [
    ("--base-model", lambda tmp: tmp / "nothing"),
    ("--pickscore-model", lambda tmp: tmp),  # a folder, but no CLIPModel in it
    ("--spm-checkpoint", lambda tmp: tmp / "missing.safetensors"),
    ("--spo-config", lambda tmp: tmp / "missing.yaml"),
])
def test_a_wrong_model_flag_is_one_line_that_names_the_study_flag(flag, make, tmp_path, capsys):
    module = _script()
    bad = make(tmp_path)
    assert module.main(["--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), flag, str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"study_world.py: {flag} {bad}:") and "=" not in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything is written


def _tiny_sdxl(tmp):
    from spotune.models.tiny import build_tiny_sdxl_pipeline

    build_tiny_sdxl_pipeline().save_pretrained(tmp / "sdxl")
    return tmp / "sdxl"


def _tiny_sd15(tmp):  # SD1.5's family, but not the world's UNet, VAE or text encoder
    from spotune.models.tiny import build_tiny_sd15_pipeline

    build_tiny_sd15_pipeline().save_pretrained(tmp / "sd15")
    return tmp / "sd15"


def _other_clip(tmp):
    from spotune.models.tiny import build_tiny_clip

    build_tiny_clip()[0].save_pretrained(tmp / "clip")
    return tmp / "clip"


def _other_spm(tmp):
    from safetensors.torch import load_file, save_file

    state = load_file(str(RESOURCES / "spm" / "spm.safetensors"))
    name = next(k for k, v in state.items() if v.ndim == 2)
    state[name] = state[name][:, :-1].contiguous()  # one layer of another width
    save_file(state, str(tmp / "spm.safetensors"))
    return tmp / "spm.safetensors"


@pytest.mark.parametrize("flag, make, needles", [
    ("--base-model", _tiny_sdxl, ["an SDXL model", "the miniature world's base is an SD1.5-family model"]),
    ("--base-model", _tiny_sd15, ["its unet is not of the miniature world's architecture", "block_out_channels"]),
    ("--pickscore-model", _other_clip, ["its CLIPModel is not of the miniature world's architecture"]),
    ("--spm-checkpoint", _other_spm, ["its step-aware preference model is not of the miniature world's", "shape"]),
])
def test_a_model_of_another_family_or_architecture_is_refused_before_anything_is_written(
        flag, make, needles, tmp_path, capsys):
    module = _script()
    bad = make(tmp_path)
    capsys.readouterr()
    assert module.main(["--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), flag, str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"study_world.py: {flag} {bad}:") and "=" not in err[0], err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_the_committed_study_measured_the_shipped_world_and_the_demo_reads_its_choice():
    """bench/results/toyworld-study is the report of the models that ship: same digests, same choice."""
    from spotune.toyworld.demo import digest_file, digest_files, study_choice

    chosen = {}
    for name in ("toyworld-study", "toyworld-study-lpo"):  # the three methods' study; LPO's, with SPO rerun beside it
        report_dir = SCRIPT.parent / "results" / name
        models = json.loads((report_dir / "study.json").read_text())["models"]
        assert models["base_digest"] == digest_files(RESOURCES / "base")
        assert models["pickscore_digest"] == digest_files(RESOURCES / "pickscore")
        assert models["spm_digest"] == digest_file(RESOURCES / "spm" / "spm.safetensors")
        if "lrm_digest" in models:
            assert models["lrm_digest"] == digest_files(RESOURCES / "lrm")
        for method, choice in study_choice(report_dir / "study_choice.json").items():
            assert chosen.setdefault(method, choice) == choice, method  # a method in both studies chose alike
    assert study_choice() == chosen
