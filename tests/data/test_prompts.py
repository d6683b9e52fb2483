"""Prompt files in every supported layout, and the errors for broken ones."""

import json

import pytest

from spotune.data.prompts import PromptFileError, load_prompt_records, load_prompts


def test_spo_4k_list(shared_data_dir):
    prompts = load_prompts(f"{shared_data_dir}/spo_4k_training_prompts.json")
    assert len(prompts) == 4000 and all(isinstance(p, str) and p for p in prompts)


def test_partiprompts_keeps_categories(shared_data_dir):
    records = load_prompt_records(f"{shared_data_dir}/PartiPrompts.tsv")
    assert len(records) == 1632 and records[0]["prompt"] == records[0]["Prompt"] and "Category" in records[0]


def test_formats(tmp_path):
    (tmp_path / "a.txt").write_text("# comment\nfirst\n\nsecond\n")
    (tmp_path / "b.json").write_text(json.dumps(["first", "second"]))
    (tmp_path / "c.jsonl").write_text('{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "d.csv").write_text("id,caption\n1,first\n2,second\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["first", "second"], "n": [1, 2]}), tmp_path / "e.parquet")
    for name in ("a.txt", "b.json", "c.jsonl", "d.csv", "e.parquet"):
        assert load_prompts(tmp_path / name) == ["first", "second"], name
    assert load_prompts("builtin:tiny-prompts")[0] == "a red circle on a white background"


@pytest.mark.parametrize("name, content, message", [
    ("e.txt", "\n\n", "holds no prompts"),
    ("b.json", "{not json", "not valid JSON"),
    ("c.json", '{"caption": "x"}', "expected a JSON list"),
    ("d.json", '[{"caption": "x"}, {"other": "y"}]', "row 2 has no 'caption' field"),  # rows count from 1
    ("e.json", '[{"caption": ""}]', "row 1 has an empty prompt"),
    ("f.csv", "a,b\n1,2\n", "cannot tell which column"),
    ("g.yaml", "x", "unknown prompt file type"),
])
def test_errors_name_file_and_row(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(PromptFileError, match=message) as info:
        load_prompts(f)
    assert str(f) in str(info.value)


def test_missing_file_and_column(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(tmp_path / "nope.txt")
    f = tmp_path / "p.csv"
    f.write_text("prompt\nx\n")
    with pytest.raises(PromptFileError, match="no column named 'caption'"):
        load_prompts(f, column="caption")


# -- text as editors save it: a UTF-8 byte-order mark, and NUL characters -------------------------

BOM = "\ufeff"


@pytest.mark.parametrize("name, content", [
    ("a.txt", "first\nsecond\n"),
    ("b.json", json.dumps(["first", "second"])),
    ("c.jsonl", '{"prompt": "first"}\n{"prompt": "second"}\n'),
    ("d.csv", "prompt,n\nfirst,1\nsecond,2\n"),  # the header's first column is found despite the mark
    ("e.tsv", "Prompt\tCategory\nfirst\tx\nsecond\ty\n"),
])
def test_a_byte_order_mark_is_not_part_of_the_first_prompt_or_column(tmp_path, name, content):
    f = tmp_path / name
    f.write_text(BOM + content, encoding="utf-8")
    assert load_prompts(f) == ["first", "second"]


def test_hpsv2_folder_files_with_a_byte_order_mark(tmp_path):
    from spotune.data.prompts import load_hpsv2_prompt_records

    (tmp_path / "anime.json").write_text(BOM + json.dumps(["first"]), encoding="utf-8")
    assert [r["prompt"] for r in load_hpsv2_prompt_records(tmp_path)] == ["first"]


@pytest.mark.parametrize("name, content, where", [
    ("a.txt", "# comment\nfirst\na red\x00 circle\n", "row 2"),  # rows count prompts, from 1
    ("b.json", json.dumps(["first", "a red\x00 circle"]), "row 2"),
    ("c.jsonl", '{"prompt": "a red\\u0000 circle"}\n', "row 1"),
    ("d.csv", "prompt\nfirst\nsecond\na red\x00 circle\n", "row 3"),
])
def test_a_nul_character_in_a_prompt_is_refused_with_file_and_row(tmp_path, name, content, where):
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    with pytest.raises(PromptFileError) as info:
        load_prompts(f)
    assert str(info.value) == f"{f}: {where} holds a NUL character (\\x00) at character 6; a prompt is plain text: remove it"
