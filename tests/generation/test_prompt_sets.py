"""Prompt sets for evaluation: PartiPrompts' TSV with categories, the HPS v2 benchmark folder, inline prompts."""

from __future__ import annotations

import json
import os

import pytest

from spotune.data.prompts import PromptFileError, load_hpsv2_prompt_records, load_prompt_set
from spotune.generation import GenerateConfig, GenerateError
from spotune.generation.runner import load_prompt_items, parse_lora_spec


def test_hpsv2_benchmark_folder(tmp_path):
    for style, prompts in {"photo": ["p1", "p2"], "anime": ["a1"], "concept-art": ["c1"], "paintings": ["x1"],
                           "extra": ["e1"]}.items():
        (tmp_path / f"{style}.json").write_text(json.dumps(prompts))
    records = load_prompt_set(tmp_path)
    assert [r["prompt"] for r in records] == ["a1", "c1", "x1", "p1", "p2", "e1"]  # the benchmark's style order first
    assert [r["category"] for r in records] == ["anime", "concept-art", "paintings", "photo", "photo", "extra"]
    items = load_prompt_items(GenerateConfig(model="m", output_dir="o", prompt_file=str(tmp_path)))
    assert items[1].category == "concept-art" and items[1].fields["style"] == "concept-art"


def test_hpsv2_folder_errors(tmp_path):
    with pytest.raises(PromptFileError, match="no .json"):
        load_hpsv2_prompt_records(tmp_path)
    (tmp_path / "anime.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(PromptFileError, match="anime.json.*list"):
        load_hpsv2_prompt_records(tmp_path)
    (tmp_path / "anime.json").write_text(json.dumps(["ok", ""]))
    with pytest.raises(PromptFileError, match="item 2"):
        load_hpsv2_prompt_records(tmp_path)


def test_partiprompts_categories(shared_data_dir):
    path = os.path.join(shared_data_dir, "PartiPrompts.tsv")
    items = load_prompt_items(GenerateConfig(model="m", output_dir="o", prompt_file=path, max_prompts=5))
    assert len(items) == 5 and items[0].prompt == "bond"
    assert {i.category for i in items} == {"Abstract"}
    assert items[0].fields["Challenge"] == "Basic"
    with pytest.raises(GenerateError, match="no column 'Kind'"):
        load_prompt_items(GenerateConfig(model="m", output_dir="o", prompt_file=path, category_column="Kind"))


def test_inline_prompts_and_lora_specs(tmp_path):
    items = load_prompt_items(GenerateConfig(model="m", output_dir="o", prompts=["one", "two"]))
    assert [i.prompt for i in items] == ["one", "two"] and items[0].category is None
    with pytest.raises(GenerateError, match="inline prompt 1 is empty"):
        load_prompt_items(GenerateConfig(model="m", output_dir="o", prompts=["one", "  "]))
    assert parse_lora_spec("runs/spo:0.8", 1.0) == (parse_lora_spec("runs/spo", 1.0)[0], 0.8)
    assert parse_lora_spec("runs/spo", 0.5)[1] == 0.5
    assert parse_lora_spec("C:/loras/a.safetensors", 1.0)[1] == 1.0  # a drive colon is not a scale
