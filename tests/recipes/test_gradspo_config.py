"""configs/sd15_gradspo.yaml carries the official GradSPO settings and differs from SPO's only where GradSPO does."""

from pathlib import Path

from spotune.config import config_to_dict, load_config
from spotune.recipes.train_spo_config import TrainSPOConfig

ROOT = Path(__file__).resolve().parents[2] / "configs"


def test_sd15_gradspo_is_the_official_recipe():
    cfg = load_config(TrainSPOConfig, ROOT / "sd15_gradspo.yaml")
    assert (cfg.algorithm, cfg.ema_decay, cfg.grad_scale) == ("gradspo", 0.9, 0.5)
    assert (cfg.num_inference_steps, cfg.eta, cfg.guidance_scale, cfg.divert_start_step) == (20, 1.0, 5.0, 4)
    assert (cfg.num_samples_per_step, cfg.preference_threshold, cfg.beta, cfg.eps) == (4, 0.3, 10.0, 0.1)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_init, cfg.lora_targets) == (4, 4.0, "gaussian", ["to_q", "to_k", "to_v", "to_out.0"])
    assert (cfg.learning_rate, cfg.adam_weight_decay, cfg.adam_epsilon, cfg.max_grad_norm) == (6e-5, 1e-4, 1e-8, 0.0)
    assert (cfg.sample_batch_size, cfg.train_batch_size, cfg.gradient_accumulation_steps) == (10, 10, 1)
    assert (cfg.num_epochs, cfg.seed, cfg.mixed_precision, cfg.judge, cfg.judge_dtype) == (10, 42, "fp16", "spm", "fp32")


def test_differs_from_sd15_spo_only_where_gradspo_does():
    spo = config_to_dict(load_config(TrainSPOConfig, ROOT / "sd15_spo.yaml"))
    grad = config_to_dict(load_config(TrainSPOConfig, ROOT / "sd15_gradspo.yaml"))
    differ = {k for k in spo if spo[k] != grad[k]}
    assert differ <= {"output_dir", "validation_prompts", "algorithm"}, differ
    assert spo["algorithm"] == "spo"  # the default


def test_sdxl_gradspo_is_the_official_sdxl_recipe():
    """configs/gradspo_sdxl.py over basic_config.py: k = 4, no inner steps, threshold 0.4, rank 64, lr 1e-5,
    2 prompts per round, 1 tuple per batch, accumulation 4; the rest as basic_config.py (and SD1.5's)."""
    cfg = load_config(TrainSPOConfig, ROOT / "sdxl_gradspo.yaml")
    assert (cfg.algorithm, cfg.ema_decay, cfg.grad_scale, cfg.sampler, cfg.num_inner_steps) == ("gradspo", 0.9, 0.5, "sdxl", 0)
    assert (cfg.num_inference_steps, cfg.eta, cfg.guidance_scale, cfg.divert_start_step) == (20, 1.0, 5.0, 4)
    assert (cfg.num_samples_per_step, cfg.preference_threshold, cfg.beta, cfg.eps) == (4, 0.4, 10.0, 0.1)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_init, cfg.lora_targets) == (64, 64.0, "gaussian", ["to_q", "to_k", "to_v", "to_out.0"])
    assert (cfg.learning_rate, cfg.adam_weight_decay, cfg.adam_epsilon, cfg.max_grad_norm) == (1e-5, 1e-4, 1e-8, 0.0)
    assert (cfg.sample_batch_size, cfg.train_batch_size, cfg.gradient_accumulation_steps) == (2, 1, 4)
    assert cfg.train_micro_batch_size is None and cfg.num_inner_epochs == 1 and cfg.resolution == 1024
    assert (cfg.num_epochs, cfg.seed, cfg.mixed_precision, cfg.judge, cfg.judge_dtype) == (10, 42, "fp16", "spm", "fp32")
