"""Every key=value a message or an example suggests is a key the user can type.

Three sweeps: (1) every ``name=`` in the text of spotune's raise statements is a key of some command;
(2) the hints of errors as a user meets them, each run through the config parser of the command that
raised it; (3) the example command lines in each command's --help, parsed as the CLI parses them
(the commands of README.md and docs/*.md are run by tests/test_readme_commands.py).
"""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
from pathlib import Path

import pytest
from safetensors.torch import save_file

from spotune.cli import build_parser
from spotune.config import ConfigError, config_from_dict, load_config, parse_overrides
from spotune.eval.config import EvalConfig
from spotune.export.api import ExportConfig
from spotune.generation.config import GenerateConfig
from spotune.recipes.eval_spm import EvalLRMConfig, EvalSPMConfig
from spotune.recipes.train_spm import TrainSPMConfig
from spotune.recipes.train_spo_config import TrainSPOConfig
from spotune.toyworld.demo import DemoConfig
from spotune.toyworld.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
COMMAND_CONFIGS = {
    "train": TrainSPOConfig, "train-spm": TrainSPMConfig, "eval-spm": EvalSPMConfig, "eval-lrm": EvalLRMConfig,
    "generate": GenerateConfig,
    "eval": EvalConfig, "demo": DemoConfig, "export": ExportConfig,
    "plan": TrainSPOConfig,  # plans a train config
    # not a `spotune` subcommand: `python -m spotune.toyworld.pretrain CONFIG key=value ...`
    "toyworld-pretrain": PretrainConfig,
}
ALL_KEYS = {f.name for cls in COMMAND_CONFIGS.values() for f in dataclasses.fields(cls)}
# `name=` in messages that reports what a file holds rather than suggesting a setting.
REPORTED_VALUES = {"format", "kind", "weights_only", "vocab_size", "k", "time_emb", "key"}
TOKEN = re.compile(r"(?<![\w./\-])([a-z_][a-z0-9_]*)=(\[[^\]]*\]|[^\s,;()'\"]*)")


def suggested(message: str) -> list[str]:
    """The ``key=value`` items of a message, as a user would type them (sentence punctuation dropped)."""
    return [f"{k}={v.rstrip('.:')}" for k, v in TOKEN.findall(message) if k not in REPORTED_VALUES]


def parse_as(command: str, items: list[str]) -> None:
    """Run ``items`` through ``command``'s config parser (keys and value types; no cross-field checks)."""
    cls = COMMAND_CONFIGS[command]
    unchecked = type(f"Unchecked{cls.__name__}", (cls,), {"validate": lambda self: None})
    config_from_dict(unchecked, parse_overrides(items), f"hint of {command}")


def test_every_key_in_a_raised_message_exists():
    found: dict[str, list[str]] = {}
    for file in sorted((ROOT / "src" / "spotune").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if not isinstance(node, ast.Raise):
                continue
            for part in ast.walk(node):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    for name, _ in TOKEN.findall(part.value):
                        found.setdefault(name, []).append(f"{file.relative_to(ROOT)}:{node.lineno}")
    unknown = {k: v for k, v in found.items() if k not in ALL_KEYS | REPORTED_VALUES}
    assert not unknown, f"messages suggest keys no command accepts: {unknown}"
    assert {"overwrite", "resume", "log_with"} <= set(found)  # the sweep does see the hints


def _message(call) -> str:
    with pytest.raises(Exception) as info:
        call()
    return str(info.value)


def test_judge_hints_name_the_training_keys():
    from spotune.preference.factory import build_judge_from_config

    messages = [
        _message(lambda: build_judge_from_config("spm", None, None, None)),
        _message(lambda: build_judge_from_config("pickscore", None, None, None)),
        _message(lambda: build_judge_from_config("tiny-clip", None, "x.bin", None)),
        _message(lambda: build_judge_from_config("pickscore", "clip", "x.bin", None)),
    ]
    assert "judge_clip_path=PATH" in messages[0] and "judge_checkpoint=PATH" in messages[0]
    assert "judge=tiny-spm" in messages[2]
    for command in ("train", "eval-spm"):
        for message in messages:
            assert suggested(message), message
            parse_as(command, suggested(message))


def test_eval_scorer_hints_name_eval_keys(tmp_path):
    from spotune.eval.runner import run_eval
    from spotune.eval.scorers import SCORER_NAMES

    (tmp_path / "images").mkdir()
    config = EvalConfig(images=[str(tmp_path / "images")], output_dir=str(tmp_path / "out"), scorers=list(SCORER_NAMES))
    message = _message(lambda: run_eval(config))
    items = suggested(message)
    assert "pickscore_model=PATH" in items and "hps_checkpoint=PATH" in items and "imagereward_checkpoint=PATH" in items
    assert not any(item.split("=")[0].endswith("_path") for item in items), items
    parse_as("eval", items)


def test_lora_hints_parse_as_train_keys(tmp_path):
    import torch

    from spotune.models.lora import add_lora, load_lora_state_dict, lora_state_dict
    from spotune.models.tiny import build_tiny_unet

    unet = build_tiny_unet(seed=2)
    targets = _message(lambda: add_lora(unet, 4, None, ["to_q", "qkv"]))
    init = _message(lambda: add_lora(unet, 4, None, ["to_q"], "olora"))
    add_lora(unet, 8, None, ["to_q"])
    other = build_tiny_unet(seed=2)
    add_lora(other, 4, None, ["to_q"])
    rank = _message(lambda: load_lora_state_dict(unet, lora_state_dict(other), source="lora.safetensors"))
    assert "lora_rank=4" in rank
    for message in (targets, init, rank):
        assert suggested(message), message
        parse_as("train", suggested(message))
    del torch


def test_run_folder_and_checkpoint_hints(tmp_path):
    from spotune.checkpoint import load_checkpoint_tensors, resolve_checkpoint
    from spotune.recipes.common import prepare_run_folder

    run = tmp_path / "run"
    first, second = run / "checkpoints" / "iter-00000001", run / "checkpoints" / "iter-00000002"
    for folder in (first, second):
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
    (second / "optimizer.safetensors").write_bytes(b"trunc")
    refused = _message(lambda: prepare_run_folder(run, None, False))
    damaged = _message(lambda: load_checkpoint_tensors(second, "optimizer.safetensors"))
    assert f"resume={first}" in damaged
    incomplete = run / "checkpoints" / "iter-00000003"
    incomplete.mkdir()
    no_state = _message(lambda: resolve_checkpoint(incomplete))
    for command in ("train", "train-spm"):
        for message in (refused, damaged, no_state):
            parse_as(command, suggested(message))


def test_prompt_demo_and_generate_hints(tmp_path):
    from spotune.data.prompts import load_prompts
    from spotune.generation.runner import parse_lora_spec
    from spotune.toyworld.demo import Demo

    table = tmp_path / "p.csv"
    table.write_text("a,b\n1,2\n")
    column = _message(lambda: load_prompts(table))
    assert "prompt_column=NAME" in column
    parse_as("train", suggested(column))
    parse_as("generate", suggested(column))

    lora = tmp_path / "l.safetensors"
    save_file({}, str(lora))
    scale = _message(lambda: parse_lora_spec(f"{lora}:big", 1.0))
    parse_as("generate", suggested(scale))

    cache = tmp_path / "cache"
    cache.write_text("")
    demo_config = load_config(DemoConfig, None, [f"cache_dir={cache}", f"output={tmp_path / 'o'}"])
    cache_hint = _message(lambda: Demo(demo_config).check())
    spm_config = load_config(DemoConfig, None, [f"spm_checkpoint={tmp_path / 'none.safetensors'}", f"output={tmp_path / 'o'}"])
    spm_hint = _message(lambda: Demo(spm_config).check())
    for message in (cache_hint, spm_hint):
        assert suggested(message), message
        parse_as("demo", suggested(message))


def _example_commands() -> list[tuple[str, str]]:
    """(where, command line) of every `spotune ...` example in the commands' --help."""
    examples = []
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():
        for line in re.findall(r"`(spotune [^`]+)`", sub.description or ""):
            examples.append((f"spotune {name} --help", line))
    return examples


@pytest.mark.parametrize("where, line", _example_commands())
def test_example_command_lines_parse(where, line, monkeypatch):
    monkeypatch.chdir(ROOT)  # examples name configs/ relative to the repository
    args = build_parser().parse_args(shlex.split(line)[1:])
    if args.command in ("export", "view") or getattr(args, "list_keys", False):
        return  # flags only (no config), checked by argparse above
    cls = COMMAND_CONFIGS[args.command]
    unchecked = type(f"Unchecked{cls.__name__}", (cls,), {"validate": lambda self: None})
    try:
        load_config(unchecked, args.config, args.overrides)
    except ConfigError as exc:
        pytest.fail(f"{where}: `{line}` does not parse: {exc}")


def test_the_sweeps_catch_a_wrong_key():
    with pytest.raises(ConfigError, match="unknown key"):
        parse_as("train", suggested("try lr=1e-5"))
    with pytest.raises(ConfigError, match="unknown key"):
        parse_as("eval", suggested("pass its local path as model_path=PATH"))
