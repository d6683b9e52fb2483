"""`spotune train algorithm=lpo` on tiny models: every LoRA weight trains with the latent judge, the run
exports and records as SPO's does, a preempted run resumes bit for bit, and the recipes hold the
authors' values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spotune.checkpoint import list_checkpoints, read_state
from spotune.cli import main
from spotune.config import load_config
from spotune.recipes.train_spo_config import TrainSPOConfig

from run_checks import check_trees_and_log

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny_lpo.yaml"
FAST = ["num_inference_steps=6", "sample_batch_size=2", "train_batch_size=4", "progress=false", "validate_every_epochs=0"]


def train(out: Path, *extra: str) -> int:
    return main(["train", "--config", str(CONFIG), f"output_dir={out}", *FAST, *extra])


def test_two_iterations_change_every_lora_weight_record_and_export(tmp_path):
    from spotune.models.lora import add_lora, lora_state_dict
    from spotune.models.tiny import build_tiny_unet

    out = tmp_path / "run"
    assert train(out, "max_iterations=2") == 0
    (checkpoint,) = list_checkpoints(out)
    state = read_state(checkpoint)
    assert state["config"]["algorithm"] == "lpo" and state["optimizer_step"] >= 2
    trained = load_file(str(checkpoint / "lora.safetensors"))
    unet = build_tiny_unet(seed=2)
    torch.manual_seed(42)
    add_lora(unet, rank=4, targets=["to_q", "to_k", "to_v", "to_out.0"])
    initial = lora_state_dict(unet)
    assert set(trained) == set(initial) and all(not torch.equal(trained[k], initial[k]) for k in trained)
    check_trees_and_log(out, "lpo", 2)
    from spotune.recipes.run_log import read_metrics

    thresholds = read_metrics(out)[0]["per_step"]["threshold"]
    assert thresholds[0] == pytest.approx(0.02) and thresholds[-1] == pytest.approx(0.0)  # lpo_threshold_max .. min
    # The result is an ordinary LoRA: the webui file and the diffusers folder.
    assert main(["export", str(out), "--format", "webui", "--output", str(tmp_path / "lpo.safetensors")]) == 0
    assert main(["export", str(out), "--format", "diffusers", "--output", str(tmp_path / "lpo-diffusers")]) == 0
    assert (tmp_path / "lpo.safetensors").is_file() and any((tmp_path / "lpo-diffusers").iterdir())


def test_a_sigterm_mid_epoch_checkpoints_and_the_resume_is_bit_exact(tmp_path, capsys, sigterm_during):
    from spotune.recipes.train_lpo import LPOTrainer

    assert train(tmp_path / "straight", "max_iterations=3") == 0
    sigterm_during(LPOTrainer, "sample", lambda trainer: trainer.iteration == 1)
    assert train(tmp_path / "split", "max_iterations=3", "checkpoint_every=0") == 143
    assert "preempted (SIGTERM) during iteration 2" in capsys.readouterr().err
    assert train(tmp_path / "split", "max_iterations=3", "checkpoint_every=0", "resume=latest") == 0
    a, b = list_checkpoints(tmp_path / "straight")[-1], list_checkpoints(tmp_path / "split")[-1]
    assert a.name == b.name == "iter-00000003"
    for name in ("lora.safetensors", "optimizer.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


# The authors' values (Kwai-Kolors/LPO lpo/configs/basic_config.py with lpo_sd-v1-5_5ep_*sigma.py and
# lpo_sdxl_5ep_*sigma.py; the accelerate config's fp16; the LRM cast to fp16 in preference_model_fns.py).
AUTHORS = {
    "sd15_lpo.yaml": dict(lora_rank=4, learning_rate=6e-5, sample_batch_size=5, num_samples_per_step=4, train_batch_size=10,
                          num_epochs=5, gradient_accumulation_steps=1, beta=500.0, eps=0.1, lpo_threshold_min=0.35,
                          lpo_threshold_max=0.5, gradient_checkpointing=False),
    "sdxl_lpo.yaml": dict(lora_rank=64, learning_rate=1e-5, sample_batch_size=4, num_samples_per_step=4, train_batch_size=4,
                          num_epochs=5, gradient_accumulation_steps=1, beta=500.0, eps=0.1, lpo_threshold_min=0.45,
                          lpo_threshold_max=0.6, gradient_checkpointing=True),
}
COMMON = dict(algorithm="lpo", judge="lrm", judge_dtype="fp16", lrm_timestep="authors", guidance_scale=5.0, eta=1.0,
              num_inference_steps=20, divert_start_step=0, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-4,
              adam_epsilon=1e-8, lora_init="gaussian", lora_targets=["to_q", "to_k", "to_v", "to_out.0"],
              mixed_precision="fp16", seed=42, max_grad_norm=0.0, lr_scheduler="constant", num_inner_steps=0)


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_recipes_hold_the_authors_values(name):
    config = load_config(TrainSPOConfig, ROOT / "configs" / name, ["pretrained_model=/m", "judge_checkpoint=/l"])
    for key, value in {**COMMON, **AUTHORS[name]}.items():
        assert getattr(config, key) == value, key
    assert config.lora_alpha == config.lora_rank  # lora_alpha = r in their script


def test_sdxl_lpo_samples_with_the_same_loop(tmp_path):
    """SDXL's LPO has no segments: branching at every step with the SDXL LRM, one iteration through the CLI."""
    out = tmp_path / "sdxl"
    assert main(["train", "--config", str(ROOT / "configs" / "tiny_sdxl.yaml"), f"output_dir={out}", "algorithm=lpo",
                 "judge=lrm", "judge_checkpoint=builtin:tiny-lrm-sdxl", "num_inner_steps=0", "divert_start_step=0",
                 "num_inference_steps=6", "lpo_threshold_min=0", "lpo_threshold_max=0.02", "max_iterations=1",
                 "progress=false", "log_with=none", "validate_every_epochs=0"]) == 0
    check_trees_and_log(out, "lpo", 1)
