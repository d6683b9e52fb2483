"""``spotune plan``: predictions on fake tensors checked against real CPU runs, the fit verdict, the memory
knobs, the CLI and its errors.

The real runs use the tiny recipe shrunk to a few steps (a second or two of compute each, recorded op by op);
full-size predictions take a minute or more each and live in docs/plan.md's table and ``bench/bench_spo.py
--predict``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from spotune.cli import main
from spotune.config import load_config
from spotune.plan.gpus import GPUS, find_gpu, gpu_for_device_name, op_seconds
from spotune.plan.predict import Prediction, measure_iteration, predict_iteration
from spotune.plan.recorder import ExecutionRecorder, PhaseRecord, rounded
from spotune.plan.report import PlanSettings, assess, knob_candidates, search_knobs
from spotune.recipes.train_spo_config import TrainSPOConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
TINY_SDXL = str(ROOT / "configs" / "tiny_sdxl.yaml")
# The tiny recipe, shrunk: 2 prompts, k = 2, 5 steps branching from step 2; threshold 0 keeps every pair in
# the real run too, so the real and the fake iteration train on the same tuples.
SMALL = ["num_inference_steps=5", "divert_start_step=2", "sample_batch_size=2", "num_samples_per_step=2",
         "train_batch_size=4", "preference_threshold=0"]


def tiny_config(*overrides: str) -> TrainSPOConfig:
    return load_config(TrainSPOConfig, TINY, [*SMALL, *overrides])


# -- prediction against measurement ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp32_runs() -> tuple[Prediction, Prediction]:
    config = tiny_config()
    return measure_iteration(config), predict_iteration(config, progress=None)


def test_fake_and_real_runs_of_the_same_recipe_have_the_same_peak_and_flops(fp32_runs):
    measured, predicted = fp32_runs
    assert measured.tuples == predicted.tuples == 3 * 2  # every pair of 3 branching steps x 2 prompts
    assert predicted.peak == measured.peak
    assert predicted.after_setup == measured.after_setup
    assert set(predicted.phases) == set(measured.phases)
    for name, record in predicted.phases.items():
        assert record.peak == measured.phases[name].peak, name
        assert record.total_flops == measured.phases[name].total_flops, name
    # The iteration allocates well beyond its weights, and every model phase computes.
    assert predicted.peak > 2 * predicted.after_setup
    for name in ("unet_sampling", "vae_decode", "judge", "train_forward", "train_reference", "train_backward"):
        assert predicted.phases[name].total_flops > 0, name


def test_a_model_folder_is_planned_from_its_configs_alone(fp32_runs, tmp_path):
    # The tiny model saved as a diffusers folder: the plan reads its configs (no weights) and predicts
    # what it predicts for the model built in code.
    from spotune.models.tiny import build_tiny_sd15_pipeline

    build_tiny_sd15_pipeline().save_pretrained(tmp_path / "model")
    from_folder = predict_iteration(tiny_config(f"pretrained_model={tmp_path / 'model'}"), progress=None)
    assert from_folder.architecture == f"the configs in {tmp_path / 'model'}"
    assert from_folder.peak == fp32_runs[1].peak and from_folder.tuples == fp32_runs[1].tuples


def test_decode_chunks_sized_by_free_memory_follow_the_planned_card(fp32_runs):
    # decode_chunk_size=0 sizes the VAE's chunks by free CUDA memory: on a planned card with almost
    # nothing free, one image at a time (4 decodes per judged step, not the 1 of the default chunk of 8).
    tight = predict_iteration(tiny_config("decode_chunk_size=0"), card_memory_bytes=1, progress=None)
    judged_steps = fp32_runs[1].phases["vae_decode"].calls
    assert tight.phases["vae_decode"].calls == 2 * 2 * judged_steps


def test_prediction_of_a_mixed_precision_run_is_within_ten_percent_of_its_measured_peak():
    # bf16 autocast with gradient checkpointing and micro-batches: the prediction follows CUDA's autocast
    # (norms in fp32), the real CPU run CPU autocast's, so they differ a little but must stay close.
    config = tiny_config("mixed_precision=bf16", "gradient_checkpointing=true", "train_micro_batch_size=2")
    measured = measure_iteration(config)
    predicted = predict_iteration(config, progress=None)
    assert predicted.tuples == measured.tuples
    assert abs(predicted.peak - measured.peak) / measured.peak < 0.10, (predicted.peak, measured.peak)


def test_the_recorder_counts_allocator_bytes_and_frees_them():
    recorder = ExecutionRecorder(keep_ops=False)
    with recorder:
        a = torch.empty(1000)  # 4,000 bytes -> 4,096 (512-byte blocks)
        b = torch.empty(10)  # 40 bytes -> 512
        view = a[:10]  # same storage: nothing new
        assert recorder.current == 4096 + 512
        del b
        assert recorder.current == 4096
        c = a @ a.view(1000, 1)[:, 0].unsqueeze(1)  # [1] -> 512 bytes, 2,000 FLOPs
    assert recorder.peak == 4096 + 512
    assert recorder.total_flops == 2 * 1000
    assert rounded(1) == 512 and rounded(0) == 0
    del a, view, c


# -- the report: fits, time, knobs ----------------------------------------------------------------------
def test_fit_verdict_keeps_the_stated_margin(fp32_runs):
    _, predicted = fp32_runs
    peak_gib = predicted.peak / 2**30
    just_enough = peak_gib * 1.1 + 1.0
    assert assess(predicted, PlanSettings(memory_gib=just_enough * 1.001))["fits"] is True
    assert assess(predicted, PlanSettings(memory_gib=just_enough * 0.999))["fits"] is False
    report = assess(predicted, PlanSettings(gpu=find_gpu("H100")))
    assert report["fits"] is True and report["card_gib"] == GPUS["H100"].memory_gib
    assert report["seconds_per_iteration"] > 0
    assert report["run_hours"] == pytest.approx(report["seconds_per_iteration"] * report["total_iterations"] / 3600)
    assert json.loads(json.dumps(report))["predicted"] is True


def test_roofline_time_is_bounded_by_compute_bandwidth_and_launch():
    h100 = GPUS["H100"]
    flops = 1e12  # 1 TFLOP of fp16 at 45% of 989.4 TFLOP/s
    assert op_seconds(h100, flops, 0, "fp16", True) == pytest.approx(1e12 / (989.4e12 * 0.45))
    assert op_seconds(h100, flops, 0, "tc-fp32", True) == pytest.approx(1e12 / (494.7e12 * 0.45))  # TF32
    assert op_seconds(h100, flops, 0, "tc-fp32", False) == pytest.approx(1e12 / (66.9e12 * 0.45))
    assert op_seconds(h100, 0, 3.35e12, "none", True) == pytest.approx(1 / 0.7)  # bandwidth-bound: 3.35 TB at 3.35 TB/s
    assert op_seconds(h100, 0, 8, "none", True) == pytest.approx(6e-6)  # launch-bound
    assert GPUS["T4"].peak("bf16", True) == GPUS["T4"].fp32  # no bf16 on Turing


def test_gpu_names():
    assert find_gpu("rtx 4090") is GPUS["RTX-4090"] and find_gpu("4090") is GPUS["RTX-4090"]
    assert find_gpu("a100-40gb") is GPUS["A100-40GB"] and find_gpu("A100") is GPUS["A100-80GB"]
    assert gpu_for_device_name("NVIDIA A100-SXM4-40GB", 39.4) is GPUS["A100-40GB"]
    assert gpu_for_device_name("NVIDIA L4", 22.0) is GPUS["L4"]  # not the L40S
    assert gpu_for_device_name("NVIDIA GeForce RTX 4070 Ti", 12.0) is GPUS["RTX-4070-Ti"]
    assert gpu_for_device_name("Some Other GPU", 8.0) is None


def _stub_prediction(config, peak_gib: float, phase: str) -> Prediction:
    record = PhaseRecord(phase, peak=int(peak_gib * 2**30))
    return Prediction(config=config, family="sd15", sampler="sd15", architecture="", judge_architecture="",
                      phases={phase: record}, peak=record.peak, after_setup=0, weights={}, trainable_parameters=0,
                      tuples=0, prompt_count=10, sdpa_kernels=[],
                      seconds_to_predict=0.0)


def test_knob_search_changes_one_setting_for_the_peaking_phase_and_predicts_again():
    config = tiny_config("offload_text_encoder=true", "train_batch_size=8")
    seen: list[TrainSPOConfig] = []

    def predict(cfg):  # stands in for a fake run: training peaks fall with each knob, then decode peaks
        seen.append(cfg)
        if not cfg.gradient_checkpointing:
            return _stub_prediction(cfg, 30, "train_backward")
        if (cfg.train_micro_batch_size or 8) > 2:
            return _stub_prediction(cfg, 20, "train_forward")
        return _stub_prediction(cfg, 14 if cfg.decode_chunk_size > 2 else 9, "vae_decode")

    steps = search_knobs(config, predict(config), PlanSettings(memory_gib=12.0), predict)
    assert [s["settings"][-1] for s in steps] == [
        "gradient_checkpointing=true", "train_micro_batch_size=4", "train_micro_batch_size=2",
        "decode_chunk_size=4", "decode_chunk_size=2"]
    assert steps[-1]["settings"] == ["gradient_checkpointing=true", "train_micro_batch_size=4", "train_micro_batch_size=2",
                                     "decode_chunk_size=4", "decode_chunk_size=2"]
    assert [s["fits"] for s in steps] == [False, False, False, False, True]
    assert len(seen) == 6  # the first prediction and one per step
    # A peak no memory setting lowers ends the search with the reason.
    stuck = search_knobs(config, _stub_prediction(config, 30, "text_encoding"), PlanSettings(memory_gib=12.0), predict)
    assert "text encoding" in stuck[-1]["stopped"]
    # Sampling: the guided UNet's rows (2 per candidate), halved.
    assert knob_candidates(config, "unet_sampling") == [("sample_micro_batch_size", 2 * 2 * 2 // 2)]
    assert knob_candidates(dataclasses.replace(config, offload_text_encoder=False), "judge")[0] == ("offload_text_encoder", True)


# -- the command ----------------------------------------------------------------------------------------
def _plan(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_command_on_the_tiny_sdxl_recipe(tmp_path, capsys):
    report_file = tmp_path / "plan.json"
    # offload_text_encoder: the encoders and the prompt cache leave the counted memory (SDXL's time ids are
    # built from Python numbers, real tensors among the fake ones).
    code, out, err = _plan(capsys, "--config", TINY_SDXL, "num_inference_steps=6", "divert_start_step=2", "num_inner_steps=1",
                           "sample_batch_size=1", "offload_text_encoder=true", "--gpu", "H100", "--json", str(report_file))
    assert code == 0, err
    assert "every figure below is predicted" in out and "FITS on H100" in out
    report = json.loads(report_file.read_text())
    assert report["fits"] is True and report["family"] == "sdxl" and report["sampler"] == "sdxl"
    assert report["peak_gib"] > 0 and report["seconds_per_iteration"] > 0
    assert report["weights_gib"]["text encoders"] == 0 and report["weights_gib"]["UNet (frozen)"] > 0
    phases = {row["phase"] for row in report["phases"]}
    assert {"unet_sampling", "vae_decode", "judge", "train_forward", "train_backward"} <= phases
    assert "plan: sampling one round" in err  # the progress lines


def test_plan_command_gradspo_does_not_fit_and_names_the_knobs(tmp_path, capsys):
    # GradSPO's own phases (the EMA model's forward and update); a card too small for it gets knobs, each
    # predicted again, and exit code 3.
    report_file = tmp_path / "plan.json"
    base = tiny_config()
    # Its peak is about 17 MiB, in backward; a 17 MiB card with a 1 MiB margin is too small for it, and
    # gradient checkpointing makes it fit.
    code, out, err = _plan(capsys, "--config", TINY, *SMALL, "algorithm=gradspo", "offload_text_encoder=true",
                           "--memory-gb", "0.017", "--margin-gb", "0.001", "--json", str(report_file))
    report = json.loads(report_file.read_text())
    assert code == 3, err
    assert report["fits"] is False and "DOES NOT FIT" in out
    phases = {row["phase"] for row in report["phases"]}
    assert {"train_ema", "ema_update"} <= phases
    assert [step["settings"] for step in report["knobs"]] == [["gradient_checkpointing=true"]]  # for the backward peak
    assert report["knobs"][0]["fits"] is True and report["knobs"][0]["peak_gib"] < report["peak_gib"]
    assert "with gradient_checkpointing=true: peak" in out
    assert base.algorithm == "spo"  # the user's config object is never changed by the plan


def test_plan_refuses_what_train_refuses_with_the_same_line(tmp_path, capsys):
    bad = ["num_inner_steps=2"]  # the SD1.5 sampler branches at every step: refused in setup
    code_plan, _, err_plan = _plan(capsys, "--config", TINY, *bad)
    code_train = main(["train", "--config", TINY, *bad, f"output_dir={tmp_path / 'run'}", "log_with=none", "progress=false"])
    err_train = capsys.readouterr().err
    assert code_plan == code_train == 1
    plan_line = err_plan.strip().splitlines()[-1].removeprefix("spotune plan: ")
    train_line = err_train.strip().splitlines()[-1].removeprefix("spotune train: ")
    assert plan_line == train_line and "num_inner_steps=2" in plan_line


def test_plan_memory_size_must_be_a_number(capsys):
    # (an unknown --gpu and other refusals: tests/test_bad_inputs.py)
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--config", TINY, "--memory-gb", "lots"])
    assert exit_info.value.code == 2
    assert "argument --memory-gb: expected a number (GiB), got 'lots'" in capsys.readouterr().err


def test_plan_json_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": 1}\n')
    code, _, err = _plan(capsys, "--config", TINY, "--json", str(mine))
    assert code == 1 and "is not a spotune plan report, so it is not replaced" in err
    assert mine.read_text() == '{"mine": 1}\n'


def test_an_lpo_recipe_is_predicted_as_it_runs():
    """LPO through the planner: the latent judge's phase is counted, nothing is decoded, and the fake
    iteration's peak and FLOPs are the real one's."""
    config = load_config(TrainSPOConfig, str(ROOT / "configs" / "tiny_lpo.yaml"),
                         ["num_inference_steps=4", "sample_batch_size=2", "num_samples_per_step=2", "train_batch_size=4",
                          "lpo_threshold_max=0"])
    measured, predicted = measure_iteration(config), predict_iteration(config, progress=None)
    assert measured.tuples == predicted.tuples == 4 * 2  # LPO judges every step, the last included
    assert predicted.peak == measured.peak
    for name, record in predicted.phases.items():
        assert record.total_flops == measured.phases[name].total_flops, name
    assert predicted.phases["judge"].total_flops > 0
    assert "vae_decode" not in predicted.phases or predicted.phases["vae_decode"].total_flops == 0
