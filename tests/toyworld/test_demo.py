"""A shrunken `spotune demo`: every stage for a step or two through the real recipes, every artifact checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from spotune.toyworld.demo import DemoError, resource_dir

RESOURCES = resource_dir()
pytestmark = pytest.mark.skipif(
    not (RESOURCES / "base" / "model_index.json").is_file() or not (RESOURCES / "spm" / "spm.safetensors").is_file(),
    reason="the toyworld weights are not in this checkout",
)


def _shrunken_yaml(src: Path, dst: Path, changes: dict) -> Path:
    values = yaml.safe_load(src.read_text())
    values.update(changes)
    dst.write_text(yaml.safe_dump(values))
    return dst


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Run the CLI once, training its own SPM (spm=train), on a fresh cache; return (output, cache, exit code, args)."""
    from spotune.cli import main

    tmp = tmp_path_factory.mktemp("demo")
    spm = _shrunken_yaml(RESOURCES / "configs" / "toyworld_spm.yaml", tmp / "spm.yaml",
                         {"train_batch_size": 4, "eval_batch_size": 8, "eval_timesteps": [0, 501], "eval_at_start": False})
    # Threshold 0: a 2-step SPM separates no candidates by 0.3, and a run without an optimizer step fails.
    spo = _shrunken_yaml(RESOURCES / "configs" / "toyworld_spo.yaml", tmp / "spo.yaml",
                         {"num_inference_steps": 3, "divert_start_step": 1, "sample_batch_size": 2, "train_batch_size": 4,
                          "preference_threshold": 0.0})
    args = [
        "spm=train", f"cache_dir={tmp / 'cache'}", "train_pairs=8", "eval_pairs=4", "data_inference_steps=2", "pickscore_steps=2", "spm_steps=2",
        "spo_iterations=1", "eval_seeds_per_prompt=1", "eval_inference_steps=2", "grid_columns=5", "threads=1",
        "progress=false", f"spm_config={spm}", f"spo_config={spo}",
    ]
    out = tmp / "out"
    code = main(["demo", "--output", str(out), *args])
    return out, tmp / "cache", code, args


def test_demo_writes_every_artifact_and_a_well_formed_report(demo_run):
    out, cache, code, _ = demo_run
    assert code == 0
    for name in ("report.json", "report.html", "grid.png", "plots/spm.png", "plots/spo.png", "spo_lora.safetensors"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    for key in ("aesthetic_win_rate", "alignment_base", "alignment_spo", "aesthetic_base", "aesthetic_spo", "seconds_total"):
        assert isinstance(report[key], float), key
    for key in ("aesthetic_win_rate", "alignment_base", "alignment_spo", "aesthetic_base", "aesthetic_spo"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["seconds_total"] > 0
    assert report["num_eval_images"] == 12  # every test prompt, one seed
    assert set(report["models"]) >= {"base", "SPO"}
    drift = report["comparisons"]["SPO"]  # layout drift: an extra field beside the unchanged numbers
    assert drift["layout_drift_size"] >= 0.0 and drift["layout_drift_position_pairs"] <= 12
    for model in report["models"].values():
        assert all(0.0 <= model[f"aesthetic_{c}"] <= 1.0 for c in ("lighting", "vividness", "cleanliness"))
        parts = [model[f"aesthetic_{c}"] for c in ("lighting", "vividness", "cleanliness")]
        assert model["aesthetic"] == pytest.approx(sum(parts) / 3)
    world = report["world"]
    x0 = world["x0_prediction"]  # 2-step DDIM: the nearest steps stand in for 951/701/501/251
    assert x0["images"] == 12 and x0["by_timestep"] and set(x0["final"]) == {"aesthetic", "lighting", "vividness", "cleanliness"}
    for row in x0["by_timestep"].values():
        assert all(r is None or -1.0 <= r <= 1.0 for r in row["corr_with_final"].values())
    acc = world["spm_accuracy_by_labels"]
    assert set(acc["vs_rater"]) == set(acc["vs_aesthetic"]) == {"0", "501"} and acc["pairs"] == 4
    views = acc["view_readings"]  # what the SPM's views still show, on the same pairs and timesteps
    assert views["pairs"] == 4 and set(views["by_timestep"]) == {"0", "501"} and views["scale_from"].endswith("summary.json")
    # The rater's labels measured again by eval-spm are the training run's own final evaluation.
    for t, a in report["spm_accuracy"]["final"].items():
        assert acc["vs_rater"][t] == pytest.approx(a) or (a != a and acc["vs_rater"][t] is None)
    assert world["multi_seed_study"].endswith("study.md")
    assert "multi-seed answer" in (out / "report.html").read_text()
    assert set(report["spm_accuracy"]["final"]) == {"0", "501"}
    assert {"pairs", "pickscore", "spm", "spo", "evaluation"} <= set(report["stages"])
    assert 0.0 <= report["pickscore"]["eval_accuracy_after"] <= 1.0
    assert all(not s["cached"] for s in report["stages"].values())
    assert report["preference_data"]["train_pairs"] == 8 and "trained in this run" in report["spm_accuracy"]["source"]
    html = (out / "report.html").read_text()
    assert 'src="grid.png"' in html and 'src="plots/spm.png"' in html and "aesthetic win rate" in html
    assert "What the SPM&#x27;s views still show" in html or "What the SPM's views still show" in html
    # The LoRA beside the report is the webui/kohya file, with the run's weights exactly.
    from spotune.export.lora_files import load_lora_file
    from spotune.export.source import read_export_source

    shipped = load_lora_file(out / "spo_lora.safetensors")
    assert shipped.source_format == "webui" and report["loras"]["SPO"] == "spo_lora.safetensors"
    trained = read_export_source(Path(report["stages"]["spo"]["folder"]) / "run").lora
    assert sorted(shipped.state_dict) == sorted(trained.state_dict)
    for key, value in trained.state_dict.items():
        torch.testing.assert_close(shipped.state_dict[key].float(), value.float().half().float(), rtol=0, atol=0)


def test_grid_has_a_row_per_model_and_a_column_per_shown_prompt(demo_run):
    from PIL import Image

    out, _, _, _ = demo_run
    report = json.loads((out / "report.json").read_text())
    grid = Image.open(out / "grid.png")
    rows = len(report["models"])
    assert grid.height == rows * (32 * 3 + 4) + 4
    assert grid.width == 120 + 5 * (32 * 3 + 4)


def test_trajectory_baseline_is_reported_when_the_recipe_offers_it(demo_run):
    from spotune.toyworld.demo import trajectory_pairing_available

    out, _, _, _ = demo_run
    report = json.loads((out / "report.json").read_text())
    assert ("trajectory DPO" in report["models"]) == trajectory_pairing_available()


def test_second_run_reuses_the_cache_and_never_overwrites_silently(demo_run, tmp_path):
    from spotune.cli import main

    out, cache, _, args = demo_run
    with pytest.raises(DemoError, match="already holds files"):
        from spotune.config import load_config
        from spotune.toyworld.demo import DemoConfig, run_demo

        run_demo(load_config(DemoConfig, None, [*args, f"output={out}"]))
    assert main(["demo", "--output", str(out), *args]) == 1  # the CLI prints the error in one line
    before = (out / "report.json").read_text()
    assert main(["demo", "--output", str(out), "--overwrite", *args]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report != json.loads(before)  # rewritten (new timings)
    assert all(s["cached"] for name, s in report["stages"].items() if name != "evaluation")
    # Same seeds, same cached models: the measured numbers are reproduced exactly.
    old = json.loads(before)
    for key in ("aesthetic_win_rate", "alignment_base", "alignment_spo", "aesthetic_base", "aesthetic_spo"):
        assert report[key] == pytest.approx(old[key], abs=1e-9), key


def test_default_demo_judges_with_the_shipped_spm_and_continues_after_a_sigterm(tmp_path, capsys, sigterm_during):
    """spm=shipped (the default): no pairs or spm stage; the shipped SPM's recorded accuracy is reported. A SIGTERM
    while SPO samples its second iteration stops the demo with exit 143, its stage's checkpoint kept; the same
    command then resumes that stage from it."""
    from spotune.cli import main
    from spotune.config import load_config
    from spotune.recipes.train_spo import SPOTrainer
    from spotune.toyworld.demo import DemoConfig, run_demo

    spo = _shrunken_yaml(RESOURCES / "configs" / "toyworld_spo.yaml", tmp_path / "spo.yaml",
                         {"num_inference_steps": 3, "divert_start_step": 1, "sample_batch_size": 2, "train_batch_size": 4,
                          "preference_threshold": 0.0})  # keep every pair: a run with no optimizer step fails
    settings = [
        f"output={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", "spo_iterations=2", "trajectory_baseline=false",
        "eval_seeds_per_prompt=1", "eval_inference_steps=2", "progress=false", f"spo_config={spo}",
    ]
    sigterm_during(SPOTrainer, "sample", lambda trainer: trainer.iteration == 1)
    assert main(["demo", *settings]) == 143
    line = capsys.readouterr().err.strip().splitlines()[-1]
    (partial,) = (tmp_path / "cache" / "toyworld").glob(".partial-spo-*")
    assert line.startswith("spotune demo: preempted (SIGTERM) in the spo stage during iteration 2, which was abandoned")
    assert f"its checkpoint {partial / 'run' / 'checkpoints' / 'iter-00000001'} is kept" in line
    assert line.endswith("and the same command continues from there (a training stage from its last checkpoint)")
    assert not (tmp_path / "cache" / "toyworld" / partial.name.removeprefix(".partial-")).exists()

    report = run_demo(load_config(DemoConfig, None, settings))
    assert not partial.exists()
    run = tmp_path / "cache" / "toyworld" / partial.name.removeprefix(".partial-") / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["iter-00000002"]  # keep_checkpoints: 1
    assert (run / "config.resumed-00000001.yaml").is_file()  # the stage continued from the kept checkpoint
    assert set(report["stages"]) == {"spo", "evaluation"}
    assert set(report["models"]) == {"base", "SPO"}
    shipped = json.loads((RESOURCES / "spm" / "spm.json").read_text())
    assert report["spm_accuracy"]["final"] == shipped["final"] and "shipped" in report["spm_accuracy"]["source"]
    # The shipped SPM's accuracy against the rater and against the aesthetic alone, measured when it was shipped.
    assert report["world"]["spm_accuracy_by_labels"] == shipped["accuracy_by_labels"]
    assert set(shipped["accuracy_by_labels"]["vs_aesthetic"]) == {"0", "251", "501", "701", "951"}
    views = shipped["accuracy_by_labels"]["view_readings"]  # what its views still show, on the same pairs
    assert set(views["by_timestep"]) == {"0", "251", "501", "701", "951"} and views["pairs"] == 256
    assert (tmp_path / "out" / "plots" / "spm.png").is_file()


def test_a_missing_base_model_is_named(tmp_path):
    from spotune.config import load_config
    from spotune.toyworld.demo import DemoConfig, run_demo

    config = load_config(DemoConfig, None, [f"output={tmp_path / 'o'}", f"base_model={tmp_path / 'nowhere'}",
                                            f"cache_dir={tmp_path / 'c'}"])
    with pytest.raises(DemoError, match="nowhere"):
        run_demo(config)


def test_repository_configs_hold_the_demo_settings():
    """configs/toyworld_{spm,spo}.yaml = the packaged stage configs plus the repository's paths, and they load."""
    from spotune.config import load_config
    from spotune.recipes.train_spm import TrainSPMConfig
    from spotune.recipes.train_spo_config import TrainSPOConfig

    repo = Path(__file__).resolve().parents[2] / "configs"
    for name, cls in (("toyworld_spm.yaml", TrainSPMConfig), ("toyworld_spo.yaml", TrainSPOConfig)):
        packaged = yaml.safe_load((RESOURCES / "configs" / name).read_text())
        by_hand = yaml.safe_load((repo / name).read_text())
        assert {k: by_hand[k] for k in packaged} == packaged
        load_config(cls, repo / name)


def test_shipping_an_spm_run_writes_fp16_weights_a_judge_loads_and_its_record(demo_run, tmp_path):
    import torch
    from safetensors.torch import load_file

    from spotune.errors import SpotuneError
    from spotune.preference.factory import build_judge
    from spotune.toyworld.shipping import ship_spm

    _, cache, _, _ = demo_run
    run = next((cache / "toyworld").glob("spm-*")) / "run"
    pairs = next((cache / "toyworld").glob("pairs-*"))
    out = ship_spm(run, pairs, tmp_path / "spm")
    weights = load_file(str(out / "spm.safetensors"))
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    record = json.loads((out / "spm.json").read_text())
    assert record["steps"] == 2 and set(record["final"]) == {"0", "501"} and record["data"]["train_pairs"] == 8
    pickscore = next((cache / "toyworld").glob("pickscore-*")) / "model"
    judge = build_judge("spm", clip_path=str(pickscore), checkpoint=str(out / "spm.safetensors"))
    scores = judge.score(torch.zeros(2, 3, 32, 32), ["a red circle on a blue background"] * 2, torch.tensor([0, 500]))
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    with pytest.raises(SpotuneError, match="already holds"):
        ship_spm(run, pairs, out)
    # With the base model and PickScore, the record holds the accuracy against both kinds of labels.
    measured = ship_spm(run, pairs, tmp_path / "spm-measured", base_model=RESOURCES / "base", pickscore=pickscore)
    by_labels = json.loads((measured / "spm.json").read_text())["accuracy_by_labels"]
    assert set(by_labels["vs_rater"]) == set(by_labels["vs_aesthetic"]) == {"0", "501"}
    assert by_labels["pairs"] == 4 and isinstance(by_labels["meets_target"], bool)


def test_the_demo_trains_at_the_settings_the_study_chose(tmp_path, monkeypatch):
    """study_settings (default on): each method's learning rate and iterations from study_choice.json;
    spo_iterations still wins over the iterations; study_settings=false keeps the YAML's."""
    from spotune.config import load_config
    from spotune.toyworld import demo as demo_mod

    choice = tmp_path / "study_choice.json"
    choice.write_text(json.dumps({"chosen": {"spo": {"learning_rate": 3e-4, "iterations": 20},
                                             "trajectory": {"learning_rate": 1e-4, "iterations": 10}}}))
    assert demo_mod.study_choice(choice)["trajectory"] == {"learning_rate": 1e-4, "iterations": 10}
    assert demo_mod.study_choice(tmp_path / "absent.json") == {}
    monkeypatch.setattr(demo_mod, "study_choice", lambda path=None: json.loads(choice.read_text())["chosen"])
    make = lambda *extra: demo_mod.Demo(load_config(demo_mod.DemoConfig, None, [f"cache_dir={tmp_path}", *extra]))  # noqa: E731
    assert make().study_extra("spo") == {"learning_rate": 3e-4, "max_iterations": 20}
    assert make().study_extra("gradspo") == {}  # not chosen: the YAML's settings
    assert make("spo_iterations=5").study_extra("trajectory") == {"learning_rate": 1e-4}
    assert make("study_settings=false").study_extra("spo") == {}
    seen = {}
    monkeypatch.setattr(demo_mod.Demo, "_stage", lambda self, name, payload, build, **kw: seen.setdefault(name, payload))
    d = make()
    d.spo_stage("spo", "base", tmp_path, "clip", tmp_path / "spm", "spm", "spo", extra=d.study_extra("spo"))
    assert seen["spo"]["config"]["learning_rate"] == 3e-4 and seen["spo"]["config"]["max_iterations"] == 20
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"chosen": {"spo": {"learning_rate": 1e-4}}}))
    monkeypatch.undo()
    with pytest.raises(DemoError, match="iterations"):
        demo_mod.study_choice(bad)
    bad.write_text("{not json")
    with pytest.raises(DemoError, match="not valid JSON"):
        demo_mod.study_choice(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(DemoError, match="'chosen'"):
        demo_mod.study_choice(bad)


def test_methods_chooses_the_fine_tunings_and_gradspo_and_lpo_join_the_report(tmp_path, monkeypatch):
    """methods=[gradspo,lpo]: GradSPO and LPO (judged by the shipped LRM) trained with the demo's YAML, seeds and
    budget, and reported like SPO."""
    from spotune.config import load_config
    from spotune.toyworld import demo as demo_mod
    from spotune.toyworld.demo import DemoConfig, run_demo

    # Three steps of two chains rarely clear the authors' thresholds: lower them, so the one iteration trains.
    name, settings = demo_mod.METHODS["lpo"]
    monkeypatch.setitem(demo_mod.METHODS, "lpo", (name, {**settings, "lpo_threshold_min": 0.0, "lpo_threshold_max": 0.05}))

    spo = _shrunken_yaml(RESOURCES / "configs" / "toyworld_spo.yaml", tmp_path / "spo.yaml",
                         {"num_inference_steps": 3, "divert_start_step": 1, "sample_batch_size": 2, "train_batch_size": 4})
    out = tmp_path / "out"
    config = load_config(DemoConfig, None, [
        f"output={out}", f"cache_dir={tmp_path / 'cache'}", "spo_iterations=1", "methods=[lpo,gradspo]",
        "eval_seeds_per_prompt=1", "eval_inference_steps=2", "progress=false", f"spo_config={spo}",
    ])
    report = run_demo(config)
    assert list(report["models"]) == ["base", "GradSPO", "LPO"] and report["headline_model"] == "GradSPO"
    assert set(report["stages"]) == {"gradspo", "lpo", "evaluation"} and set(report["comparisons"]) == {"GradSPO", "LPO"}
    stage = json.loads((Path(report["stages"]["gradspo"]["folder"]) / "stage.json").read_text())
    assert stage["payload"]["config"]["algorithm"] == "gradspo"
    lpo = json.loads((Path(report["stages"]["lpo"]["folder"]) / "stage.json").read_text())["payload"]["config"]
    assert (lpo["algorithm"], lpo["judge"], lpo["divert_start_step"]) == ("lpo", "lrm", 0)
    run_config = (Path(report["stages"]["lpo"]["folder"]) / "run" / "config.yaml").read_text()
    assert f"judge_checkpoint: {RESOURCES / 'lrm'}" in run_config  # the shipped latent reward model
    for name in ("gradspo", "lpo"):
        assert (out / f"{name}_lora.safetensors").is_file()
    assert "GradSPO" in (out / "report.html").read_text() and "LPO" in (out / "report.html").read_text()
    from spotune.toyworld.report import table_rows

    header, rows = table_rows(report)
    seconds = {row[0]: row[header.index("training time")] for row in rows}
    assert seconds["base"] == "-" and all(seconds[name].endswith(" s") for name in ("GradSPO", "LPO")), seconds


def test_spo_stage_keys_leave_out_the_gradspo_settings(tmp_path, monkeypatch):
    """Caches made before GradSPO existed stay valid: spo/trajectory stage keys do not see its settings."""
    from spotune.config import load_config
    from spotune.toyworld import demo as demo_mod

    seen = {}
    monkeypatch.setattr(demo_mod.Demo, "_stage", lambda self, name, payload, build, **kw: seen.setdefault(name, payload))
    d = demo_mod.Demo(load_config(demo_mod.DemoConfig, None, [f"cache_dir={tmp_path}"]))
    for method in ("spo", "trajectory", "gradspo", "lpo"):
        d.spo_stage(method, "base", tmp_path, "clip", tmp_path / "spm", "spm", method)
    for method in ("spo", "trajectory"):
        assert not {"algorithm", "ema_decay", "grad_scale"} & set(seen[method]["config"]), method
    for method in ("spo", "trajectory", "gradspo"):
        assert not {"lpo_threshold_min", "lpo_threshold_max", "lrm_timestep"} & set(seen[method]["config"]), method
    lpo = seen["lpo"]
    assert not {"ema_decay", "grad_scale"} & set(lpo["config"]) and lpo["config"]["algorithm"] == "lpo"
    assert lpo["spm"] == lpo["judge_clip"] == demo_mod.digest_files(RESOURCES / "lrm")  # the LRM, not the SPM
    assert seen["trajectory"]["config"]["pairing"] == "trajectory"
    assert {k: seen["gradspo"]["config"][k] for k in ("algorithm", "ema_decay", "grad_scale")} == {
        "algorithm": "gradspo", "ema_decay": 0.9, "grad_scale": 0.5}


def test_the_shipped_trajectory_stage_is_the_one_the_default_demo_would_build(tmp_path, monkeypatch):
    """The package's prebuilt trajectory stage carries the key and settings of the default demo's trajectory
    stage, so the default demo copies it instead of training (a changed recipe or judge gives another key:
    rebuild it with `spotune demo shipped_stages=false` and `python -m spotune.toyworld.shipping --stage`)."""
    from spotune.config import load_config
    from spotune.toyworld import demo as demo_mod
    from spotune.toyworld.evaluate import unet_with_lora
    from spotune.toyworld.resources import SHIPPED_STAGES_FOLDER
    from spotune.toyworld.shipped_stages import RESOURCES_PLACEHOLDER

    seen = {}
    monkeypatch.setattr(demo_mod.Demo, "_stage", lambda self, name, payload, build, **kw: seen.setdefault(name, payload))
    d = demo_mod.Demo(load_config(demo_mod.DemoConfig, None, [f"cache_dir={tmp_path}"]))
    assert d.methods() == ["spo", "trajectory"]
    d.spo_stage("trajectory", demo_mod.digest_files(d.base_dir), *d.shipped_judge(), "trajectory",
                extra=d.study_extra("trajectory"))
    key = demo_mod.stage_key("trajectory", seen["trajectory"])
    shipped = sorted((RESOURCES / SHIPPED_STAGES_FOLDER).glob("trajectory-*"))
    assert [p.name for p in shipped] == [f"trajectory-{key}"], "the shipped trajectory stage no longer matches the default demo's key"
    info = json.loads((shipped[0] / "stage.json").read_text())
    assert info["shipped"] is True and info["payload"] == json.loads(json.dumps(seen["trajectory"], default=str))
    state = (next((shipped[0] / "run" / "checkpoints").iterdir()) / "state.json").read_text()
    assert f'"base_model": "{RESOURCES_PLACEHOLDER}/base"' in state and "/tmp/" not in state  # no build machine's path
    monkeypatch.undo()
    cache = demo_mod.StageCache(tmp_path / "cache", shipped=RESOURCES / SHIPPED_STAGES_FOLDER)
    record = cache.get_or_build("trajectory", seen["trajectory"], build=lambda folder: pytest.fail("built, not copied"))
    assert record.shipped and record.cached and record.seconds == 0.0 and record.build_seconds > 60
    unet = unet_with_lora(_base_unet(d.base_dir), record.folder / "run")
    assert any("lora" in name for name, _ in unet.named_parameters())


def _base_unet(base_dir: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(base_dir / "unet")


def test_a_shipped_stage_is_copied_into_the_cache_with_this_machines_paths(tmp_path, capsys):
    """shipping --stage packs a cache's stage with its paths as placeholders; a demo whose key matches copies it
    into its own cache with its own paths (then it is cached); another key builds; an earlier shipped stage is
    replaced only with --overwrite."""
    from spotune.toyworld import shipping
    from spotune.toyworld.demo import StageCache, stage_key
    from spotune.toyworld.resources import resource_dir

    payload = {"config": {"learning_rate": 1e-4}}
    key = stage_key("trajectory", payload)
    built = tmp_path / "machine-a" / "toyworld" / f"trajectory-{key}"
    (built / "run").mkdir(parents=True)
    (built / "run" / ".spotune.lock").write_text("")
    (built / "run" / "state.json").write_text(json.dumps({"base_model": str(resource_dir() / "base"),
                                                          "output_dir": str(built.parent / f".partial-trajectory-{key}" / "run")}))
    (built / "run" / "weights.bin").write_bytes(bytes(range(256)))
    (built / "stage.json").write_text(json.dumps({"stage": "trajectory", "key": key, "payload": payload, "seconds": 99.0,
                                                  "summary": {}}))
    shipped_root = tmp_path / "package-stages"
    packed = shipping.ship_stage(built, shipped_root)
    assert packed == shipped_root / built.name and not (packed / "run" / ".spotune.lock").exists()
    assert str(tmp_path) not in (packed / "run" / "state.json").read_text()

    cache = StageCache(tmp_path / "machine-b", shipped=shipped_root)
    (cache.partial_folder("trajectory", key) / "run").mkdir(parents=True)  # an interrupted build of the same stage
    record = cache.get_or_build("trajectory", payload, build=lambda folder: pytest.fail("built, not copied"))
    assert (record.shipped, record.cached, record.build_seconds, record.folder) == (True, True, 99.0, tmp_path / "machine-b" / built.name)
    state = json.loads((record.folder / "run" / "state.json").read_text())
    assert state == {"base_model": str(resource_dir() / "base"), "output_dir": str(record.folder / "run")}
    assert (record.folder / "run" / "weights.bin").read_bytes() == bytes(range(256))
    assert not cache.partial_folder("trajectory", key).exists()  # superseded by the shipped folder
    again = cache.get_or_build("trajectory", payload, build=lambda folder: pytest.fail("built, not cached"))
    assert again.shipped and again.folder == record.folder
    other = cache.get_or_build("trajectory", {"config": {"learning_rate": 3e-4}}, build=lambda folder: {"trained": 1})
    assert not other.shipped and not other.cached
    assert StageCache(tmp_path / "machine-c").get_or_build("trajectory", payload, build=lambda f: {}).shipped is False

    built2 = built.with_name("trajectory-0123456789abcdef")
    built2.mkdir()
    (built2 / "stage.json").write_text(json.dumps({"stage": "trajectory", "key": "0123456789abcdef", "payload": {}, "seconds": 1.0}))
    with pytest.raises(shipping.SpotuneError, match="already ships stage trajectory .* --overwrite"):
        shipping.ship_stage(built2, shipped_root)
    assert shipping.ship_stage(built2, shipped_root, overwrite=True).is_dir() and not packed.exists()
    assert shipping.main(["--stage", str(tmp_path / "no-such-stage")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no stage.json" in err[0] and "CACHE/toyworld/<stage>-<key>" in err[0]
