"""The pre-training's VAE stage taken from an existing VAE folder (vae_from=) instead of trained."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from diffusers import AutoencoderKL

from spotune.config import ConfigError
from spotune.toyworld.pretrain import PretrainConfig, Pretrainer

SHIPPED_VAE = resources.files("spotune.resources") / "toyworld" / "base" / "vae"


def _pretrainer(tmp_path, **overrides) -> Pretrainer:
    config = PretrainConfig(work_dir=str(tmp_path / "work"), num_images=16, **overrides)
    config.validate()
    trainer = Pretrainer(config)
    trainer.data()
    return trainer


def test_vae_from_finishes_the_stage_with_those_weights_and_no_training(tmp_path):
    trainer = _pretrainer(tmp_path, vae_from=str(SHIPPED_VAE))
    trainer.vae_stage()
    source = AutoencoderKL.from_pretrained(str(SHIPPED_VAE)).float()
    for name, value in source.state_dict().items():
        assert torch.equal(trainer.vae.state_dict()[name], value), name
    assert trainer.vae.config.scaling_factor == pytest.approx(source.config.scaling_factor)
    stage = tmp_path / "work" / "vae"
    assert not (stage / "checkpoint.json").exists()  # no optimizer step was taken
    info = json.loads((stage / "done.json").read_text())
    assert str(SHIPPED_VAE) in info["source"]
    assert info["scaling_factor"] == pytest.approx(source.config.scaling_factor)
    assert 0.0 <= info["recon_alignment"] <= 1.0 and info["recon_mse"] < 0.05  # measured on this work_dir's renders

    # A later run of the same work_dir reloads the finished stage: the same weights, scaling factor kept.
    again = _pretrainer(tmp_path, vae_from="")
    again.vae_stage()
    assert again.vae.config.scaling_factor == pytest.approx(source.config.scaling_factor)
    assert all(torch.equal(again.vae.state_dict()[k], v) for k, v in source.state_dict().items())


def test_vae_from_a_folder_without_a_vae_is_one_error_naming_it(tmp_path):
    trainer = _pretrainer(tmp_path, vae_from=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="nowhere.*config.json missing.*vae_from="):
        trainer.vae_stage()


def test_vae_from_another_architecture_is_refused(tmp_path):
    other = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4)
    other.save_pretrained(tmp_path / "other")
    trainer = _pretrainer(tmp_path, vae_from=str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="not the world's"):
        trainer.vae_stage()
    assert not (tmp_path / "work" / "vae" / "done.json").exists()
