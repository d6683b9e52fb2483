"""Demo stages that ship with the package: packed from a demo's stage cache, unpacked into a user's.

A stage folder (``CACHE/toyworld/<stage>-<key>/``) names this machine's folders in its text files: the run's
``config.yaml`` and checkpoint ``state.json`` hold the base model's and the judge's paths, which later readers
use (an export reads the base model's VAE config for the image size). So a packed stage replaces the package's
``resources/toyworld`` folder and the stage's own folder by two placeholders, and unpacking writes the paths
of the machine it lands on back in, as if the stage had been built there. Binary files (weights, TensorBoard
events) are copied unchanged: no reader takes a path from them.

The folder name's key hashes every setting the stage's result depends on (:func:`spotune.toyworld.demo.stage_key`),
so a packed stage stands in for exactly the build that would have written it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from spotune.toyworld.resources import resource_dir

RESOURCES_PLACEHOLDER = "{spotune-toyworld-resources}"  # the package's resources/toyworld folder
STAGE_PLACEHOLDER = "{spotune-demo-stage}"  # the stage's own folder in the cache
TEXT_SUFFIXES = (".json", ".jsonl", ".yaml", ".yml", ".txt", ".html")
PACK_SKIPPED = "files whose names start with a dot (the run's lock file)"


def _as_text(path: str, suffix: str) -> str:
    """``path`` as it is written inside a file of this suffix (JSON escapes a Windows backslash)."""
    return json.dumps(path)[1:-1] if suffix in (".json", ".jsonl") else path


def _rewrite(source: Path, target: Path, pairs: list[tuple[str, str]]) -> None:
    """Copy ``source`` to ``target``, replacing each (old, new) path in a text file; others byte for byte."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix not in TEXT_SUFFIXES:
        shutil.copyfile(source, target)
        return
    text = source.read_text(encoding="utf-8")
    for old, new in pairs:
        text = text.replace(_as_text(old, source.suffix), _as_text(new, source.suffix))
    target.write_text(text, encoding="utf-8")


def pack_stage(stage: Path, out: Path, build_folders: list[Path]) -> list[Path]:
    """Copy the finished stage folder ``stage`` into the new folder ``out`` with this machine's paths replaced.

    Args:
        stage: a complete stage folder (``stage.json`` inside).
        out: where the packed copy goes (its parent must exist; ``out`` itself is filled, not replaced).
        build_folders: the folders the stage was built in (the cache folder and its ``.partial-`` build folder),
            each replaced by :data:`STAGE_PLACEHOLDER`.
    Returns:
        The files written, relative to ``out``.
    """
    pairs = [(str(resource_dir()), RESOURCES_PLACEHOLDER)] + [(str(f), STAGE_PLACEHOLDER) for f in build_folders]
    written = []
    for file in sorted(p for p in stage.rglob("*") if p.is_file()):
        relative = file.relative_to(stage)
        if any(part.startswith(".") for part in relative.parts):
            continue
        _rewrite(file, out / relative, pairs)
        written.append(relative)
    return written


def unpack_stage(packed: Path, folder: Path, final: Path) -> None:
    """Copy the packed stage ``packed`` into ``folder`` (a temporary folder that becomes ``final``), writing this
    machine's package folder and ``final`` where the placeholders stand."""
    pairs = [(RESOURCES_PLACEHOLDER, str(resource_dir())), (STAGE_PLACEHOLDER, str(final))]
    for file in sorted(p for p in packed.rglob("*") if p.is_file()):
        _rewrite(file, folder / file.relative_to(packed), pairs)
