"""Prompt files: read captions (and their other columns) from the formats people keep them in.

Accepted: ``.txt`` (one prompt per line, blank lines and ``#`` comments skipped), ``.json`` (a list of
strings, or of objects with a caption field, e.g. the SPO 4k list ``[{"caption": ...}, ...]``),
``.jsonl``, ``.csv`` / ``.tsv`` (a named column; PartiPrompts' ``Prompt`` is found on its own), and
``.parquet``. Text files are read as UTF-8 with or without a byte-order mark (as Windows editors save
them). Errors name the file and the row, counted from 1 (the first prompt, after any header, is row 1).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from spotune.errors import SpotuneError, one_line

# Column names tried, in order, when the caller does not name one.
PROMPT_COLUMNS = ("prompt", "Prompt", "caption", "Caption", "text", "TEXT")


def _tiny_prompts() -> list[str]:
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle"]
    return [f"a {c} {s} on a {b} background" for c in colours for s in shapes for b in ("white", "black")]


# Small prompt lists that ship with the package, for CPU runs that need no files.
BUILTIN_PROMPT_SETS = {"builtin:tiny-prompts": _tiny_prompts}


class PromptFileError(SpotuneError, ValueError):
    """A prompt file that is missing, empty, or not in a readable layout."""


def refuse_nul(prompt: str, where: str) -> None:
    """Refuse a prompt holding a NUL character (``where``: e.g. ``"FILE: row 3"``): a PNG text chunk cannot hold
    it (NUL separates its fields), and it comes from a binary file or a broken export, not from a caption."""
    position = prompt.find("\x00")
    if position >= 0:
        raise PromptFileError(
            f"{where} holds a NUL character (\\x00) at character {position + 1}; a prompt is plain text: remove it"
        )


def _pick_column(columns: list[str], column: str | None, path: Path) -> str:
    if column is not None:
        if column not in columns:
            raise PromptFileError(f"{path}: no column named '{column}' (columns: {columns})")
        return column
    for name in PROMPT_COLUMNS:
        if name in columns:
            return name
    raise PromptFileError(
        f"{path}: cannot tell which column holds the prompts (columns: {columns}); name it with "
        f"prompt_column=NAME (tried {list(PROMPT_COLUMNS)})"
    )


def _records_from_json_items(items: list[Any], column: str | None, path: Path, first_row: int) -> list[dict[str, Any]]:
    records = []
    key: str | None = None
    for i, item in enumerate(items, start=first_row):
        if isinstance(item, str):
            records.append({"prompt": item})
        elif isinstance(item, dict):
            if key is None:
                key = _pick_column(list(item), column, path)
            if key not in item:
                raise PromptFileError(f"{path}: row {i} has no '{key}' field (fields: {list(item)})")
            records.append({**item, "prompt": item[key]})
        else:
            raise PromptFileError(f"{path}: row {i} is {type(item).__name__}, expected a string or an object")
    return records


def load_prompt_records(path: str | Path, column: str | None = None) -> list[dict[str, Any]]:
    """Every row of a prompt file as a dict with at least ``"prompt"`` (other columns kept).

    Args:
        path: the prompt file.
        column: the field holding the prompt (csv/tsv/json objects/parquet); guessed when ``None``.
    Raises:
        PromptFileError: missing file, unknown suffix, malformed content, empty prompts.
    """
    if str(path) in BUILTIN_PROMPT_SETS:
        return [{"prompt": p} for p in BUILTIN_PROMPT_SETS[str(path)]()]
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8-sig").splitlines()
            records = [{"prompt": ln.strip()} for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        elif suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as exc:
                raise PromptFileError(f"{path}: not valid JSON ({exc})") from None
            if not isinstance(data, list):
                raise PromptFileError(f"{path}: expected a JSON list of prompts or of objects, got {type(data).__name__}")
            records = _records_from_json_items(data, column, path, first_row=1)
        elif suffix == ".jsonl":
            items = []
            for i, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines()):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise PromptFileError(f"{path}: line {i + 1} is not valid JSON ({exc})") from None
            records = _records_from_json_items(items, column, path, first_row=1)
        elif suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
                key = _pick_column(list(reader.fieldnames or []), column, path)
                records = []
                for row in reader:
                    if row[key] is None:  # a short row: fewer fields than the header names
                        raise PromptFileError(
                            f"{path}: row {len(records) + 1} (line {reader.line_num}) has no '{key}' field"
                        )
                    records.append({**row, "prompt": row[key]})
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            import pyarrow as pa

            try:
                table = pq.read_table(path)
            except (OSError, pa.ArrowException) as exc:
                raise PromptFileError(f"{path}: cannot read it as parquet ({one_line(exc)})") from None
            key = _pick_column(table.column_names, column, path)
            records = [{**row, "prompt": row[key]} for row in table.to_pylist()]
        else:
            raise PromptFileError(f"{path}: unknown prompt file type '{suffix}' (use .txt, .json, .jsonl, .csv, .tsv, .parquet)")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not UTF-8 text ({exc})") from None
    # Rows are numbered from 1 in every format: the first prompt (the first data row after a header) is row 1.
    for i, record in enumerate(records, start=1):
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise PromptFileError(f"{path}: row {i} has a prompt of type {type(prompt).__name__}, expected text")
        if not prompt.strip():
            raise PromptFileError(f"{path}: row {i} has an empty prompt")
        refuse_nul(prompt, f"{path}: row {i}")
    if not records:
        raise PromptFileError(f"prompt file {path} holds no prompts")
    return records


def load_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """The prompts of a prompt file, in file order (see :func:`load_prompt_records`)."""
    return [r["prompt"] for r in load_prompt_records(path, column)]


# -- the HPS v2 benchmark layout --------------------------------------------------------------------

# The benchmark's four styles, in the order its tables list them (files are <style>.json).
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")


def load_hpsv2_prompt_records(folder: str | Path) -> list[dict[str, Any]]:
    """Prompts of the HPS v2 benchmark layout: a folder with one JSON list of prompts per style.

    ``anime.json``, ``concept-art.json``, ``paintings.json`` and ``photo.json`` come first in that
    order; any other ``*.json`` list in the folder is read after them, as its own style (sorted by name).

    Returns:
        One record per prompt: ``{"prompt": ..., "style": <file stem>, "category": <file stem>}``.
    Raises:
        PromptFileError: no JSON file in the folder, or a file that is not a list of non-empty strings.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PromptFileError(f"{folder} is not a folder (expected the HPS v2 benchmark layout: one <style>.json per style)")
    found = {f.stem: f for f in folder.glob("*.json")}
    files = [found[s] for s in HPSV2_STYLES if s in found] + sorted(f for s, f in found.items() if s not in HPSV2_STYLES)
    if not files:
        raise PromptFileError(f"{folder} holds no .json file (expected anime.json, concept-art.json, paintings.json, photo.json)")
    records: list[dict[str, Any]] = []
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PromptFileError(f"{file}: not valid UTF-8 JSON ({exc})") from None
        if not isinstance(data, list) or not data:
            raise PromptFileError(f"{file}: expected a non-empty JSON list of prompts (the HPS v2 benchmark layout)")
        for i, prompt in enumerate(data, start=1):
            if not isinstance(prompt, str) or not prompt.strip():
                raise PromptFileError(f"{file}: item {i} is {prompt!r}, expected a non-empty prompt string")
            refuse_nul(prompt, f"{file}: item {i}")
            records.append({"prompt": prompt, "style": file.stem, "category": file.stem})
    return records


def load_prompt_set(path: str | Path, column: str | None = None) -> list[dict[str, Any]]:
    """Records of a prompt file (:func:`load_prompt_records`) or of an HPS v2 benchmark folder."""
    if Path(path).is_dir():
        return load_hpsv2_prompt_records(path)
    return load_prompt_records(path, column)
