"""The on-disk layout of ``spotune generate`` output, and the code that reads and writes it.

::

    OUT/
      grid.png                   rows = models, columns = the first seeds (optional)
      base/                      one folder per model, named by the model's label
        generation.json          what made these images: base model, LoRAs, sampler settings, seed
        metadata.jsonl           one JSON object per image (file, prompt_index, image_index, prompt, seed, ...)
        00000-000.png            prompt 0, image 0 (PNG with a webui-style ``parameters`` chunk)
        00000-001.png
      spo/
        ...

Images of different models with the same file name share the prompt and the seed, so they started
from the same noise: that is what makes win rates between models meaningful.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from spotune.errors import SpotuneError
from spotune.utils.io import atomic_write_json, atomic_write_text

GENERATION_FORMAT = "spotune-generation-v1"
GENERATION_FILE = "generation.json"
METADATA_FILE = "metadata.jsonl"
GRID_FILE = "grid.png"
_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


class GenerationLayoutError(SpotuneError, ValueError):
    """An output folder that is not (or no longer) what ``spotune generate`` wrote."""


def image_filename(prompt_index: int, image_index: int) -> str:
    """``00012-003.png`` for prompt 12, image 3 (fixed widths, so names sort in generation order)."""
    return f"{prompt_index:05d}-{image_index:03d}.png"


def image_key(prompt_index: int, image_index: int) -> str:
    """The identity of an image across models: ``00012-003``."""
    return f"{prompt_index:05d}-{image_index:03d}"


def safe_name(name: str) -> str:
    """A label usable as a folder name: runs of other characters become ``-``."""
    cleaned = _NAME_RE.sub("-", name).strip("-.")
    if not cleaned:
        raise GenerationLayoutError(f"model name {name!r} has no usable characters (use letters, digits, . _ -)")
    return cleaned


def read_generation(folder: Path) -> dict[str, Any] | None:
    """The parsed ``generation.json`` of a model folder, or ``None`` when there is none."""
    file = folder / GENERATION_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GenerationLayoutError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != GENERATION_FORMAT:
        raise GenerationLayoutError(f"{file}: not a spotune generation record (expected format {GENERATION_FORMAT})")
    return data


def write_generation(folder: Path, data: dict[str, Any]) -> None:
    atomic_write_json(folder / GENERATION_FILE, {"format": GENERATION_FORMAT, **data})


def read_metadata(folder: Path) -> list[dict[str, Any]]:
    """Every record of ``metadata.jsonl`` (empty when the file does not exist yet)."""
    file = folder / METADATA_FILE
    if not file.is_file():
        return []
    records = []
    for number, line in enumerate(file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GenerationLayoutError(f"{file}: line {number} is not valid JSON ({exc})") from None
        for key in ("file", "prompt"):
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise GenerationLayoutError(f"{file}: line {number} has no '{key}' text field")
        records.append(record)
    return records


def write_metadata(folder: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite ``metadata.jsonl`` atomically, one record per line, in (prompt, image) order."""
    ordered = sorted(records, key=lambda r: (r.get("prompt_index", 0), r.get("image_index", 0), r["file"]))
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in ordered)
    atomic_write_text(folder / METADATA_FILE, text)


def model_folders(root: Path) -> list[Path]:
    """Model folders under a generation root: ``base`` first, then by name."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and (p / GENERATION_FILE).is_file()]
    return sorted(found, key=lambda p: (p.name != "base", p.name))
