"""Round trip: the config.yaml a run writes, read back with --config, is the same config, for every shipped config.

Runs write ``config_to_yaml(config)`` (``RUN/config.yaml``); ``tests/test_readme_commands.py`` checks it on a
real tiny run. Here every file in ``configs/`` (and the demo's stage configs) goes through that writer and
back, once as shipped and once with every text field set to text that YAML 1.1 would have read as
something else (``no``, ``null``, ``1e-5``, ...).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from spotune.config import config_to_dict, config_to_yaml, load_config
from spotune.eval.config import EvalConfig
from spotune.generation.config import GenerateConfig
from spotune.recipes.train_spm import TrainSPMConfig
from spotune.recipes.train_spo_config import TrainSPOConfig
from spotune.toyworld.demo import resource_dir
from spotune.toyworld.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]

# Each shipped config, the command's config class, and the keys its "Run:" line adds on the command line.
SHIPPED = {
    "sd15_spo.yaml": (TrainSPOConfig, []),
    "sd15_gradspo.yaml": (TrainSPOConfig, []),
    "sd15_lpo.yaml": (TrainSPOConfig, []),
    "sdxl_lpo.yaml": (TrainSPOConfig, []),
    "tiny_lpo.yaml": (TrainSPOConfig, []),
    "sd15_spo_24gb.yaml": (TrainSPOConfig, []),
    "tiny_cpu.yaml": (TrainSPOConfig, []),
    "tiny_sdxl.yaml": (TrainSPOConfig, []),
    "sdxl_spo.yaml": (TrainSPOConfig, []),
    "sdxl_gradspo.yaml": (TrainSPOConfig, []),
    "sdxl_spo_24gb.yaml": (TrainSPOConfig, []),
    "toyworld_spo.yaml": (TrainSPOConfig, []),
    "sd15_spm.yaml": (TrainSPMConfig, ["clip_path=PATH", "processor_path=PATH", "train_data=PATH"]),
    "sdxl_spm.yaml": (TrainSPMConfig, ["vae=PATH", "clip_path=PATH", "processor_path=PATH", "train_data=PATH"]),
    "tiny_spm.yaml": (TrainSPMConfig, ["train_data=pairs.parquet", "eval_data=pairs.parquet"]),
    "sd15_lrm.yaml": (TrainSPMConfig, ["pretrained_model=PATH", "train_data=PATH"]),
    "tiny_lrm.yaml": (TrainSPMConfig, ["train_data=pairs.parquet"]),
    "toyworld_spm.yaml": (TrainSPMConfig, []),
    "sd15_generate.yaml": (GenerateConfig, ["model=/models/stable-diffusion-v1-5"]),
    "tiny_generate.yaml": (GenerateConfig, []),
    "sd15_eval.yaml": (EvalConfig, []),
    "sdxl_generate.yaml": (GenerateConfig, ["model=/models/stable-diffusion-xl-base-1.0"]),
    "sdxl_eval.yaml": (EvalConfig, []),
    "tiny_eval.yaml": (EvalConfig, []),
    "toyworld_pretrain.yaml": (PretrainConfig, []),
}
# The demo's stage configs; the demo adds the paths of its own stages.
DEMO_STAGES = {
    "toyworld_spm.yaml": (TrainSPMConfig, ["train_data=pairs/train.parquet", "eval_data=pairs/eval.parquet"]),
    "toyworld_spo.yaml": (TrainSPOConfig, []),
}
FILES = sorted(ROOT.glob("configs/*.yaml")) + sorted((resource_dir() / "configs").glob("*.yaml"))


def _table(path: Path) -> dict[str, tuple[type, list[str]]]:
    return DEMO_STAGES if path.parent == resource_dir() / "configs" else SHIPPED


def _case(path: Path) -> tuple[type, list[str]]:
    return _table(path)[path.name]
TRICKY_TEXT = ["no", "yes", "off", "null", "~", "1e-5", "010", "0x10", "true", "", "a: b", "# c", "[x]", "'q'", "1:30"]


def test_every_shipped_config_is_covered():
    missing = sorted(str(f) for f in FILES if f.name not in _table(f))
    assert not missing, f"add {missing} to SHIPPED (or DEMO_STAGES) with its config class"


def _unchecked(cls: type) -> type:
    """``cls`` without its cross-field checks, so odd text can sit in any text field."""
    return dataclasses.make_dataclass(f"Unchecked{cls.__name__}", [], bases=(cls,), namespace={"validate": lambda self: None})


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_written_config_reads_back_as_the_same_config(path, tmp_path):
    cls, overrides = _case(path)
    config = load_config(cls, path, overrides)
    written = tmp_path / "config.yaml"
    written.write_text(config_to_yaml(config))
    assert load_config(cls, written) == config


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_text_fields_keep_their_text_through_the_round_trip(path, tmp_path):
    cls, overrides = _case(path)
    unchecked = _unchecked(cls)
    config = load_config(unchecked, path, overrides)
    hints = typing.get_type_hints(cls)
    text_fields = [f.name for f in dataclasses.fields(cls) if hints[f.name] in (str, str | None)]
    assert text_fields
    changes = {name: TRICKY_TEXT[i % len(TRICKY_TEXT)] for i, name in enumerate(text_fields)}
    config = dataclasses.replace(config, **changes)
    written = tmp_path / "config.yaml"
    written.write_text(config_to_yaml(config))
    back = load_config(unchecked, written)
    assert config_to_dict(back) == config_to_dict(config)
    assert all(type(getattr(back, name)) is str for name in text_fields)


def _optional_text_fields(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] == str | None]


@pytest.mark.parametrize("path", [f for f in FILES if f.name in _table(f) and _optional_text_fields(_case(f)[0])],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_optional_text_keeps_null_as_text_and_none_as_none(path, tmp_path):
    cls, overrides = _case(path)
    unchecked = _unchecked(cls)
    optional = _optional_text_fields(cls)
    changes = {name: ("null" if i % 2 else None) for i, name in enumerate(optional)}
    config = dataclasses.replace(load_config(unchecked, path, overrides), **changes)
    written = tmp_path / "config.yaml"
    written.write_text(config_to_yaml(config))
    back = load_config(unchecked, written)
    assert {name: getattr(back, name) for name in optional} == changes
