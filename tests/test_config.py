"""The config system: YAML + key=value, typed coercion, unknown keys, help text."""

import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Literal

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
    # max_grad_norm 0: the authors' scripts clip an exhausted iterator, so nothing (configs/sd15_spo.yaml says why)
    assert (sd15.learning_rate, sd15.adam_weight_decay, sd15.max_grad_norm, sd15.adam_epsilon) == (6e-5, 1e-4, 0.0, 1e-8)
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


# -- values mean what was typed ------------------------------------------------------------------
@dataclass
class Typed:
    text: str = ""
    maybe_text: str | None = None
    choice: Literal["no", "fp16", "bf16"] = "fp16"
    flag: bool = False
    count: int = 1
    rate: float = 1e-4
    maybe_rate: float | None = None
    names: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=lambda: [0, 1])
    extra: dict = field(default_factory=dict)


@pytest.mark.parametrize("override, key, expected", [
    ("text=no", "text", "no"),
    ("text=yes", "text", "yes"),
    ("text=1e-5", "text", "1e-5"),
    ("text=010", "text", "010"),
    ("text=null", "text", "null"),
    ("text=", "text", ""),
    ("text=on, off", "text", "on, off"),
    ("maybe_text=null", "maybe_text", None),
    ("maybe_text=~", "maybe_text", None),
    ("maybe_text=no", "maybe_text", "no"),
    ("choice=no", "choice", "no"),
    ("flag=yes", "flag", True),
    ("flag=No", "flag", False),
    ("flag=1", "flag", True),
    ("flag=0", "flag", False),
    ("flag=TRUE", "flag", True),
    ("count=1e3", "count", 1000),
    ("count=0x10", "count", 16),
    ("rate=1e-5", "rate", 1e-5),
    ("rate=6.0e-5", "rate", 6e-5),
    ("rate=3", "rate", 3.0),
    ("maybe_rate=null", "maybe_rate", None),
    ("maybe_rate=2e-4", "maybe_rate", 2e-4),
    ("names=[no, yes, to_out.0]", "names", ["no", "yes", "to_out.0"]),
    ("names=a,b", "names", ["a", "b"]),
    ("steps=[0, 251]", "steps", [0, 251]),
    ("extra={a: no, b: 1e-5, c: true}", "extra", {"a": "no", "b": 1e-5, "c": True}),
])
def test_command_line_values_are_read_by_the_field_type(override, key, expected):
    cfg = load_config(Typed, None, [override])
    value = getattr(cfg, key)
    assert value == expected and type(value) is type(expected)


def test_file_values_are_read_by_the_field_type(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "text: no\nmaybe_text: 'null'\nchoice: no\nflag: yes\ncount: 20\nrate: 1e-5\nmaybe_rate:\n"
        "names: [off, 'on']\nextra: {a: no, b: 1e-5, c: 010}\n"
    )
    cfg = load_config(Typed, f)
    assert cfg == Typed(text="no", maybe_text="null", choice="no", flag=True, count=20, rate=1e-5, maybe_rate=None,
                        names=["off", "on"], extra={"a": "no", "b": 1e-5, "c": 10})
    assert type(cfg.text) is str and type(cfg.names[0]) is str


def test_core_schema_loader_has_only_true_false_booleans():
    from spotune.config import load_yaml

    data = load_yaml("a: no\nb: yes\nc: on\nd: true\ne: 1e-5\nf: 6.0e-5\ng: 1:30\nh: 2024-01-01\ni: null\nj: .inf\n")
    assert data == {"a": "no", "b": "yes", "c": "on", "d": True, "e": 1e-5, "f": 6e-5, "g": "1:30",
                    "h": "2024-01-01", "i": None, "j": float("inf")}


@pytest.mark.parametrize("override, message", [
    ("flag=maybe", r"command line: key 'flag' expects true or false \(yes/no, 1/0\), got 'maybe' \(e.g. flag=false\)"),
    ("count=many", r"key 'count' expects an integer, got 'many' \(e.g. count=1\)"),
    ("rate=fast", r"key 'rate' expects a number, got 'fast' \(e.g. rate=0.0001\)"),
    ("maybe_rate=fast", r"key 'maybe_rate' expects a number or null, got 'fast'"),
    ("choice=fp8", r"key 'choice' expects one of no, fp16, bf16, got 'fp8' \(e.g. choice=fp16\)"),
    ("steps=[0, x]", r"key 'steps' expects an integer, got 'x'"),
    ("names=[a,", r"key 'names' expects a list of text values, got '\[a,' \(e.g. names=\[a,b\]\)"),
])
def test_unconvertible_values_name_key_value_type_and_an_example(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Typed, None, [override])


def test_a_bad_value_in_a_file_names_the_file_and_an_overridden_one_the_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("count: many\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(f))}: key 'count' expects an integer, got 'many'"):
        load_config(Typed, f)
    g = tmp_path / "ok.yaml"
    g.write_text("count: 2\n")
    with pytest.raises(ConfigError, match=r"^command line: key 'flag'"):
        load_config(Typed, g, ["flag=maybe"])


def test_unreadable_config_files_get_one_line_naming_the_file(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("text: ok\nnegative: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(Typed, latin1)
    assert str(err.value) == f"config file {latin1} is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"
    with pytest.raises(ConfigError) as err:
        load_config(Typed, tmp_path)
    assert str(err.value) == f"config file {tmp_path} is a folder, not a YAML file (give --config the .yaml file itself)"
    broken = tmp_path / "broken.yaml"
    broken.write_text("text: [1,\n")
    with pytest.raises(ConfigError) as err:
        load_config(Typed, broken)
    assert "\n" not in str(err.value) and str(broken) in str(err.value) and "line " in str(err.value)


def test_a_utf8_file_with_a_byte_order_mark_reads(tmp_path):
    f = tmp_path / "bom.yaml"
    f.write_bytes("\ufefftext: café\n".encode("utf-8"))
    assert load_config(Typed, f).text == "café"


def test_the_train_command_keeps_no_as_text(tmp_path, capsys):
    from spotune.cli import main

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    code = main(["train", "--config", str(tiny), "mixed_precision=no", "negative_prompt=no",
                 "gradient_checkpointing=yes", "learning_rate=1e-5", f"output_dir={tmp_path}", "--print-config"])
    assert code == 0
    text = capsys.readouterr().out
    assert "\nmixed_precision: 'no'\n" in text and "\nnegative_prompt: 'no'\n" in text
    assert "\ngradient_checkpointing: true\n" in text and "\nlearning_rate: 1.0e-05\n" in text


@pytest.mark.parametrize("argv, expected", [
    (["train", "negative_prompt=no", "mixed_precision=no", "overwrite=no"],
     ["negative_prompt: 'no'", "mixed_precision: 'no'", "overwrite: false"]),
    (["train-spm", "train_data=p.parquet", "clip_path=builtin:tiny-clip", "negative_prompt=no", "mixed_precision=no",
      "learning_rate=1e-5"], ["negative_prompt: 'no'", "mixed_precision: 'no'", "learning_rate: 1.0e-05"]),
    (["eval-spm", "data=p.parquet", "negative_prompt=no", "mixed_precision=no", "overwrite=yes"],
     ["negative_prompt: 'no'", "mixed_precision: 'no'", "overwrite: true"]),
    (["generate", "model=builtin:tiny-sd15", "output_dir=g", "prompts=[no, yes]", "negative_prompt=no", "grid=no"],
     ["prompts: ['no', 'yes']", "negative_prompt: 'no'", "grid: false"]),
    (["eval", "images=[g]", "output_dir=r", "title=no", "baseline=off"], ["title: 'no'", "baseline: 'off'"]),
    (["demo", "spm_config=no", "trajectory_baseline=no", "seed=1e1"],
     ["spm_config: 'no'", "trajectory_baseline: false", "seed: 10"]),
])
def test_every_key_value_command_reads_values_through_the_config_system(argv, expected, capsys):
    from spotune.cli import main

    assert main([*argv, "--print-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for line in expected:
        assert line in lines, (argv[0], line)
