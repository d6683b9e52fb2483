"""configs/sd15_spo_24gb.yaml and configs/sdxl_spo_24gb.yaml are their family's paper recipe with memory
settings only: the same maths."""

from pathlib import Path

import pytest

from spotune.config import config_to_dict, load_config
from spotune.recipes.train_spo_config import TrainSPOConfig

ROOT = Path(__file__).resolve().parents[2] / "configs"
# Settings that change where and in how many pieces the work is done, never what is computed
# (micro-batches: tests/recipes/test_train_spo_speed.py; sampling's UNet rows:
# tests/diffusion/test_sampler.py; the rest decode, judge or encode in pieces).
MEMORY_KEYS = {
    "output_dir", "train_micro_batch_size", "gradient_checkpointing", "decode_chunk_size", "judge_batch_size",
    "offload_text_encoder", "sample_micro_batch_size",
}


@pytest.mark.parametrize("paper, small", [("sd15_spo.yaml", "sd15_spo_24gb.yaml"), ("sdxl_spo.yaml", "sdxl_spo_24gb.yaml")])
def test_differs_from_the_paper_recipe_only_in_memory_settings(paper, small):
    spo = config_to_dict(load_config(TrainSPOConfig, ROOT / paper))
    reduced = config_to_dict(load_config(TrainSPOConfig, ROOT / small))
    differ = {k for k in spo if spo[k] != reduced[k]}
    assert differ == MEMORY_KEYS, differ
    cfg = load_config(TrainSPOConfig, ROOT / small)
    assert cfg.gradient_checkpointing and cfg.offload_text_encoder
    assert cfg.train_micro_batch_size < cfg.train_batch_size
