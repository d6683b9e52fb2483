"""The world's optional noise schedule: SNR shift and zero terminal SNR (components.ddim_scheduler)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler

from spotune.config import ConfigError
from spotune.models.tiny import sd15_ddim_scheduler
from spotune.toyworld import components as C
from spotune.toyworld.pretrain import PretrainConfig, Pretrainer, _Stage, timestep_lookup


def _snr(scheduler: DDIMScheduler) -> torch.Tensor:
    a = scheduler.alphas_cumprod.double()
    return a / (1 - a)


def test_default_is_sd15_schedule_exactly():
    assert torch.equal(C.ddim_scheduler().alphas_cumprod, sd15_ddim_scheduler().alphas_cumprod)
    assert C.ddim_scheduler().config.get("trained_betas") is None


def test_shift_multiplies_snr_at_every_timestep():
    ratio = _snr(C.ddim_scheduler(C.RESOLUTION_SNR_SHIFT)) / _snr(sd15_ddim_scheduler())
    assert C.RESOLUTION_SNR_SHIFT == 64
    # the scheduler rebuilds alphas_cumprod from the betas in float32: 0.1% is its rounding, not the maths
    assert torch.allclose(ratio, torch.full_like(ratio, 64.0), rtol=2e-3)
    exact = C.shifted_alphas_cumprod(sd15_ddim_scheduler().alphas_cumprod, 4.0)
    base = sd15_ddim_scheduler().alphas_cumprod.double()
    assert torch.allclose(exact / (1 - exact), 4 * base / (1 - base), rtol=1e-12)


def test_zero_terminal_snr_keeps_first_step_and_ends_near_zero():
    shifted = C.ddim_scheduler(64.0)
    rescaled = C.ddim_scheduler(64.0, zero_terminal_snr=True)
    a = rescaled.alphas_cumprod.double()
    assert a[-1].item() == pytest.approx(2.0**-24, rel=1e-3)
    assert (a[1:] < a[:-1]).all()  # still a noise schedule
    assert a[0].item() == pytest.approx(shifted.alphas_cumprod[0].item(), rel=1e-6)
    snr, snr_shifted = _snr(rescaled), _snr(shifted)
    assert (snr[1:-1] <= snr_shifted[1:-1] * (1 + 1e-4)).all()  # the rescale only adds noise
    rescaled.set_timesteps(20)
    first = int(rescaled.timesteps[0])
    assert first == 951  # SD1.5's leading spacing: the sampler never evaluates t = 999
    assert 0.01 < snr[first].item() < 0.1
    assert snr[701].item() > 1.0


def test_saved_scheduler_carries_the_schedule(tmp_path):
    scheduler = C.ddim_scheduler(64.0, zero_terminal_snr=True)
    scheduler.save_pretrained(tmp_path)
    loaded = DDIMScheduler.from_pretrained(tmp_path)
    assert torch.equal(loaded.alphas_cumprod, scheduler.alphas_cumprod)
    assert torch.equal(DDIMScheduler.from_config(loaded.config).alphas_cumprod, scheduler.alphas_cumprod)


def test_bad_shift_is_refused():
    with pytest.raises(ValueError, match="snr_shift"):
        C.ddim_scheduler(0.0)
    with pytest.raises(ConfigError, match="snr_shift must be > 0"):
        PretrainConfig(snr_shift=-1.0).validate()


def _check(tmp_path, **cfg):
    stage = _Stage(tmp_path, "unet")
    Pretrainer._check_schedule(SimpleNamespace(cfg=PretrainConfig(**cfg)), stage)
    return stage


def test_unet_stage_records_its_schedule_and_refuses_another(tmp_path):
    stage = _check(tmp_path, snr_shift=64.0, zero_terminal_snr=True)
    recorded = json.loads((stage.folder / "schedule.json").read_text())
    assert {key: recorded.pop(key) for key in ("seed", "unet_steps", "unet_lr")} == {"seed": 0, "unet_steps": 3000, "unet_lr": 3e-4}
    assert recorded == {"snr_shift": 64.0, "zero_terminal_snr": True, "min_snr_gamma": 5.0, "timestep_density": "uniform",
                        "unet_batch_size": 128, "unet_warmup": 200, "caption_dropout": 0.1, "ema_decay": 0.999}
    _check(tmp_path, snr_shift=64.0, zero_terminal_snr=True)  # the same schedule resumes
    with pytest.raises(ConfigError, match="snr_shift=64.0 or another work_dir="):
        _check(tmp_path, snr_shift=1.0, zero_terminal_snr=True)
    with pytest.raises(ConfigError, match="zero_terminal_snr=true"):
        _check(tmp_path, snr_shift=64.0, zero_terminal_snr=False)
    with pytest.raises(ConfigError, match="min_snr_gamma=5.0 or another work_dir="):
        _check(tmp_path, snr_shift=64.0, zero_terminal_snr=True, min_snr_gamma=320.0)


def _unet_file(tmp_path, name: str, text: str) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / name).write_text(text)


def test_record_without_loss_weight_counts_as_gamma_5(tmp_path):
    _unet_file(tmp_path, "schedule.json", '{"snr_shift": 64.0, "zero_terminal_snr": true}')
    _check(tmp_path, snr_shift=64.0, zero_terminal_snr=True)
    with pytest.raises(ConfigError, match="trained with min_snr_gamma=5.0"):
        _check(tmp_path, snr_shift=64.0, zero_terminal_snr=True, min_snr_gamma=320.0)


def test_unrecorded_progress_counts_as_sd15_schedule(tmp_path):
    _unet_file(tmp_path, "checkpoint.json", "{}")
    with pytest.raises(ConfigError, match="trained with snr_shift=1.0"):
        _check(tmp_path, snr_shift=64.0)
    _check(tmp_path)  # SD1.5's schedule resumes it
    assert json.loads((tmp_path / "unet" / "schedule.json").read_text())["snr_shift"] == 1.0


@pytest.mark.parametrize("text", ['[64, true]', '{"snr_shift": "64"}', '{"zero_terminal_snr": "false"}',
                                  '{"timestep_density": 1}'])
def test_malformed_record_is_one_error_naming_the_file(tmp_path, text):
    _unet_file(tmp_path, "schedule.json", text)
    with pytest.raises(ConfigError, match=r"schedule.json: expected an object .* pass another work_dir="):
        _check(tmp_path)


def test_negative_gamma_is_refused():
    with pytest.raises(ConfigError, match="min_snr_gamma must be >= 0"):
        PretrainConfig(min_snr_gamma=-1.0).validate()


def _min_snr_weight(snr: torch.Tensor) -> torch.Tensor:
    return torch.clamp(snr, max=5.0) / snr


def _layout_band_share(snr: torch.Tensor) -> float:
    return ((snr >= 0.1) & (snr <= 1)).double().mean().item()


def test_uniform_density_draws_t_itself():
    assert timestep_lookup(C.ddim_scheduler(64.0, True).alphas_cumprod, "uniform") is None


def test_sd15_density_is_identity_on_sd15_schedule():
    lookup = timestep_lookup(sd15_ddim_scheduler().alphas_cumprod, "sd15_snr")
    assert torch.equal(lookup, torch.arange(1000))


def test_sd15_density_trains_a_shifted_schedule_on_sd15_snr_and_weight():
    shifted = C.ddim_scheduler(64.0, zero_terminal_snr=True)
    lookup = timestep_lookup(shifted.alphas_cumprod, "sd15_snr")
    assert lookup.shape == (1000,) and lookup.dtype == torch.int64
    assert (lookup[1:] >= lookup[:-1]).all()  # order of noise kept
    snr, reference = _snr(shifted)[lookup], _snr(sd15_ddim_scheduler())
    assert (torch.log(snr) - torch.log(reference)).abs().max().item() < 0.06
    assert (_min_snr_weight(snr) - _min_snr_weight(reference)).abs().max().item() < 0.01
    # uniform t under the shifted schedule spends far less training at SNR 0.1-1 than SD1.5 does; this restores it
    assert _layout_band_share(_snr(shifted)) < 0.15
    assert _layout_band_share(snr) == pytest.approx(_layout_band_share(reference), abs=0.01)


def test_unknown_density_is_refused_and_a_resume_under_another_is_too(tmp_path):
    with pytest.raises(ConfigError, match="timestep_density must be one of uniform, sd15_snr"):
        PretrainConfig(timestep_density="logit").validate()
    _check(tmp_path, snr_shift=64.0, zero_terminal_snr=True, timestep_density="sd15_snr")
    with pytest.raises(ConfigError, match='trained with timestep_density="sd15_snr"'):
        _check(tmp_path, snr_shift=64.0, zero_terminal_snr=True)


def test_record_without_density_counts_as_uniform(tmp_path):
    _unet_file(tmp_path, "schedule.json", '{"snr_shift": 64.0, "zero_terminal_snr": true, "min_snr_gamma": 5.0}')
    _check(tmp_path, snr_shift=64.0, zero_terminal_snr=True)
    with pytest.raises(ConfigError, match='trained with timestep_density="uniform"'):
        _check(tmp_path, snr_shift=64.0, zero_terminal_snr=True, timestep_density="sd15_snr")


def test_resume_under_another_recipe_is_refused(tmp_path):
    _check(tmp_path, unet_steps=3000)
    with pytest.raises(ConfigError, match=r"asks for unet_steps=6000 \(the cosine learning rate .*pass unet_steps=3000"):
        _check(tmp_path, unet_steps=6000)
    with pytest.raises(ConfigError, match="trained with unet_lr=0.0003"):
        _check(tmp_path, unet_lr=1e-4)
    with pytest.raises(ConfigError, match="trained with seed=0"):
        _check(tmp_path, seed=1)


def test_record_without_recipe_gains_it_before_training_starts(tmp_path):
    _unet_file(tmp_path, "schedule.json", '{"snr_shift": 64.0, "zero_terminal_snr": true, "min_snr_gamma": 5.0}')
    _check(tmp_path, snr_shift=64.0, zero_terminal_snr=True, unet_steps=2000)
    recorded = json.loads((tmp_path / "unet" / "schedule.json").read_text())
    assert recorded["unet_steps"] == 2000 and recorded["snr_shift"] == 64.0 and recorded["timestep_density"] == "uniform"
    with pytest.raises(ConfigError, match="trained with unet_steps=2000"):
        _check(tmp_path, snr_shift=64.0, zero_terminal_snr=True)


def test_progress_under_an_older_record_keeps_its_recipe_unknown(tmp_path):
    _unet_file(tmp_path, "schedule.json", '{"snr_shift": 64.0, "zero_terminal_snr": true, "min_snr_gamma": 5.0}')
    (tmp_path / "unet" / "checkpoint.json").write_text("{}")
    _check(tmp_path, snr_shift=64.0, zero_terminal_snr=True, unet_steps=2000)
    _check(tmp_path, snr_shift=64.0, zero_terminal_snr=True, unet_steps=3000)  # nothing known to refuse it by
    recorded = json.loads((tmp_path / "unet" / "schedule.json").read_text())
    assert "unet_steps" not in recorded and recorded["timestep_density"] == "uniform"


def test_recipe_value_of_the_wrong_type_is_one_error(tmp_path):
    _unet_file(tmp_path, "schedule.json", '{"unet_steps": "3000"}')
    with pytest.raises(ConfigError, match=r"schedule.json: unet_steps should be a number, found \"3000\""):
        _check(tmp_path)
