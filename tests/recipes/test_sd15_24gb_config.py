"""configs/sd15_spo_24gb.yaml is sd15_spo.yaml with memory settings only: the same maths."""

from pathlib import Path

from spotune.config import config_to_dict, load_config
from spotune.recipes.train_spo_config import TrainSPOConfig

ROOT = Path(__file__).resolve().parents[2] / "configs"
# Settings that change where and in how many pieces the work is done, never what is computed
# (micro-batches: tests/recipes/test_train_spo_speed.py; the rest decode, judge or encode in pieces).
MEMORY_KEYS = {
    "output_dir", "train_micro_batch_size", "gradient_checkpointing", "decode_chunk_size", "judge_batch_size",
    "offload_text_encoder",
}


def test_differs_from_sd15_spo_only_in_memory_settings():
    spo = config_to_dict(load_config(TrainSPOConfig, ROOT / "sd15_spo.yaml"))
    small = config_to_dict(load_config(TrainSPOConfig, ROOT / "sd15_spo_24gb.yaml"))
    differ = {k for k in spo if spo[k] != small[k]}
    assert differ == MEMORY_KEYS, differ
    cfg = load_config(TrainSPOConfig, ROOT / "sd15_spo_24gb.yaml")
    assert cfg.train_batch_size == 10 and cfg.train_micro_batch_size == 2 and cfg.gradient_accumulation_steps == 1
