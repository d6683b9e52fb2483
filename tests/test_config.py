"""The config system: YAML + key=value, typed coercion, unknown keys, help text."""

from dataclasses import dataclass, field

import pytest

from spotune.config import ConfigError, config_to_yaml, describe_config, load_config
from spotune.recipes.train_spo_config import TrainSPOConfig


@dataclass
class Small:
    lr: float = field(default=1e-4, metadata={"help": "learning rate"})
    steps: int = 10
    name: str | None = None
    flag: bool = False
    targets: list[str] = field(default_factory=lambda: ["a"])


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 3.0e-4\nsteps: 5\ntargets: [x, y]\n")
    cfg = load_config(Small, f, ["steps=7", "flag=true", "name=run", "targets=[p,q]"])
    assert cfg == Small(lr=3e-4, steps=7, name="run", flag=True, targets=["p", "q"])


def test_unknown_key_names_itself_and_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stepz'\]. Valid keys: flag, lr, name, steps, targets"):
        load_config(Small, None, ["stepz=3"])
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1\nbogus: 2\n")
    with pytest.raises(ConfigError, match=str(f)):
        load_config(Small, f)


@pytest.mark.parametrize("override, message", [
    ("steps=1.5", "key 'steps' expects an integer"),
    ("steps=abc", "key 'steps' expects an integer"),
    ("lr=fast", "key 'lr' expects a number"),
    ("flag=maybe", "key 'flag' expects true or false"),
    ("steps", "not of the form key=value"),
])
def test_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Small, None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Small, tmp_path / "missing.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Small, f)
    g = tmp_path / "broken.yaml"
    g.write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Small, g)


def test_yaml_round_trip_keeps_help_as_comments(tmp_path):
    cfg = Small(lr=2e-4, name="x")
    text = config_to_yaml(cfg)
    assert "# learning rate\nlr: 0.0002" in text
    f = tmp_path / "round.yaml"
    f.write_text(text)
    assert load_config(Small, f) == cfg


def test_shipped_configs_load_and_carry_the_paper_recipe():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    sd15 = load_config(TrainSPOConfig, root / "sd15_spo.yaml")
    assert (sd15.num_inference_steps, sd15.eta, sd15.guidance_scale, sd15.divert_start_step) == (20, 1.0, 5.0, 4)
    assert (sd15.num_samples_per_step, sd15.preference_threshold, sd15.beta, sd15.eps) == (4, 0.3, 10.0, 0.1)
    assert (sd15.lora_rank, sd15.lora_alpha, sd15.lora_init) == (4, 4.0, "gaussian")
    assert sd15.lora_targets == ["to_q", "to_k", "to_v", "to_out.0"]
    assert (sd15.learning_rate, sd15.adam_weight_decay, sd15.max_grad_norm, sd15.adam_epsilon) == (6e-5, 1e-4, 1.0, 1e-8)
    assert (sd15.sample_batch_size, sd15.train_batch_size, sd15.num_epochs, sd15.seed) == (10, 10, 10, 42)
    assert sd15.mixed_precision == "fp16" and sd15.judge == "spm"
    load_config(TrainSPOConfig, root / "tiny_cpu.yaml")


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="divert_start_step"):
        load_config(TrainSPOConfig, None, ["divert_start_step=20"])
    with pytest.raises(ConfigError, match="contradict"):
        load_config(TrainSPOConfig, None, ["resume=latest", "overwrite=true"])
    with pytest.raises(ConfigError, match="key 'mixed_precision' expects one of no, fp16, bf16, got 'fp8'"):
        load_config(TrainSPOConfig, None, ["mixed_precision=fp8"])


def test_describe_lists_every_key():
    table = describe_config(TrainSPOConfig)
    for key in ("learning_rate", "divert_start_step", "resume", "judge_checkpoint"):
        assert f"`{key}`" in table
