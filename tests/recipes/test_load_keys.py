"""model_family=, vae= and resolution= in `spotune train`, `train-spm` and `eval-spm`: passed to the loader,
refused as one line when wrong, and not changeable on resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spotune.cli import main
from spotune.data.pickapic import synthetic_pairs, write_pairs_parquet
from spotune.models.tiny import SDXL_VAE_SCALING_FACTOR, build_tiny_vae

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["train", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "num_inference_steps=6", "divert_start_step=4",
         "sample_batch_size=2", "train_batch_size=4", "preference_threshold=0.0", "log_with=none", "progress=false",
         "validate_every_epochs=0", "max_iterations=1"]
SPM = str(ROOT / "configs" / "tiny_spm.yaml")


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def sd15_vae(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd15-vae")
    build_tiny_vae(3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fp16_fix_vae(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl-vae-fp16-fix")
    build_tiny_vae(4, scaling_factor=SDXL_VAE_SCALING_FACTOR, force_upcast=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs_parquet(tmp_path_factory.mktemp("pairs") / "pairs.parquet", *synthetic_pairs(4, 32, seed=0))


def test_train_refuses_the_wrong_family_vae_and_resolution(tmp_path, capsys, sd15_vae):
    out = str(tmp_path / "run")
    assert main([*TRAIN, f"output_dir={out}", "pretrained_model=builtin:tiny-sdxl", "model_family=sd15"]) == 1
    one_line_error(capsys, "model builtin:tiny-sdxl is an SDXL model but model_family=sd15 asks for an SD1.5-family model")
    assert main([*TRAIN, f"output_dir={out}", "pretrained_model=builtin:tiny-sdxl", "model_family=xl"]) == 1
    one_line_error(capsys, "model_family", "xl")
    assert main([*TRAIN, f"output_dir={out}", "pretrained_model=builtin:tiny-sdxl", f"vae={sd15_vae}"]) == 1
    one_line_error(capsys, f"vae={sd15_vae} is an SD1.5 VAE", "the model is an SDXL model")
    assert main([*TRAIN, f"output_dir={out}", "pretrained_model=builtin:tiny-sdxl", "resolution=30"]) == 1
    one_line_error(capsys, "resolution=30 is not a positive multiple of the VAE's factor 4", "resolution=32")


def test_train_sdxl_with_the_fp16_fix_vae_and_resume_keeps_both_keys(tmp_path, capsys, fp16_fix_vae):
    out = tmp_path / "run"
    keys = [f"output_dir={out}", "pretrained_model=builtin:tiny-sdxl", "model_family=sdxl", f"vae={fp16_fix_vae}"]
    assert main([*TRAIN, *keys]) == 0
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["model_family"] == "sdxl" and written["vae"] == str(fp16_fix_vae)
    capsys.readouterr()
    assert main([*TRAIN, *keys[:-1], "max_iterations=2", "resume=latest"]) == 1
    one_line_error(capsys, "resume changes vae")
    assert main([*TRAIN, *keys[:2], f"vae={fp16_fix_vae}", "max_iterations=2", "resume=latest"]) == 1
    one_line_error(capsys, "resume changes model_family", "'sdxl' -> 'auto'")


def test_train_sdxl_in_fp16_keeps_its_vae_in_fp32(tmp_path, caplog):
    """Sampling decodes fp16 latents with the fp32 SDXL VAE (force_upcast) without a dtype clash."""
    import logging

    caplog.set_level(logging.INFO, logger="spotune.models.loading")
    out = tmp_path / "run"
    assert main([*TRAIN, f"output_dir={out}", "pretrained_model=builtin:tiny-sdxl", "mixed_precision=fp16"]) == 0
    assert "the VAE runs in float32" in caplog.text
    assert (out / "checkpoints" / "iter-00000001").is_dir()


def test_print_config_shows_the_keys(capsys):
    assert main(["train", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "model_family=sdxl", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model_family"] == "sdxl" and printed["vae"] is None


def test_eval_spm_on_tiny_sdxl_and_its_family_check(tmp_path, capsys, pairs, fp16_fix_vae):
    common = ["eval-spm", "judge=tiny-clip", f"data={pairs}", "batch_size=4", "guidance_scale=1.0", "num_workers=0",
              "progress=false", "timesteps=[0,501]"]
    out = tmp_path / "acc.csv"
    assert main([*common, "pretrained_model=builtin:tiny-sdxl", f"vae={fp16_fix_vae}", f"output={out}"]) == 0
    assert out.read_text().count("\n") == 3  # header + two timesteps
    assert main([*common, "pretrained_model=builtin:tiny-sdxl", "model_family=sd15"]) == 1
    one_line_error(capsys, "is an SDXL model but model_family=sd15")
    assert main([*common, "pretrained_model=builtin:tiny-sdxl", "resolution=30"]) == 1
    one_line_error(capsys, "resolution=30 is not a positive multiple of the VAE's factor 4")


def test_train_spm_passes_the_keys_to_the_loader(tmp_path, capsys, pairs, sd15_vae):
    base = ["train-spm", "--config", SPM, f"train_data={pairs}", "train_batch_size=4", "guidance_scale=1.0",
            "progress=false", "log_with=none", "pretrained_model=builtin:tiny-sdxl"]
    assert main([*base, f"output_dir={tmp_path / 'a'}", "model_family=sd15"]) == 1
    one_line_error(capsys, "is an SDXL model but model_family=sd15")
    assert main([*base, f"output_dir={tmp_path / 'b'}", f"vae={sd15_vae}"]) == 1
    one_line_error(capsys, "is an SD1.5 VAE (scaling_factor 0.18215) but the model is an SDXL model")
    assert main([*base, f"output_dir={tmp_path / 'c'}", "resolution=30"]) == 1
    one_line_error(capsys, "resolution=30 is not a positive multiple of the VAE's factor 4")
