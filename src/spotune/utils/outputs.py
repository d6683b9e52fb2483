"""What ``overwrite`` may delete: only outputs spotune wrote, recognised by a marker file or their layout.

A folder output carries ``.spotune-output.json`` naming what spotune put there; an existing folder may be
replaced when everything in it is either listed in its marker or, for outputs written before markers
existed, part of the output's known layout. Anything else (a user's own folder, or files a user added to
an output) makes the replacement refuse, listing what would have been deleted.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from spotune.utils.io import atomic_write_json

OUTPUT_MARKER = ".spotune-output.json"
_LISTED = 8  # names shown in a refusal before "and N more"


def write_output_marker(folder: str | Path, kind: str) -> None:
    """Record in ``folder`` that spotune wrote it (``kind``: e.g. ``"export-merged"``) and which entries."""
    folder = Path(folder)
    entries = sorted(p.name for p in folder.iterdir() if p.name != OUTPUT_MARKER)
    atomic_write_json(folder / OUTPUT_MARKER, {"written_by": "spotune", "kind": kind, "entries": entries})


def foreign_entries(folder: str | Path, layout: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Top-level names in ``folder`` that spotune did not write there (empty: safe to replace).

    Args:
        folder: an existing folder.
        layout: the names this kind of output consists of, accepted when the folder has no marker.
    """
    folder = Path(folder)
    known: set[str] = set(layout)
    marker = folder / OUTPUT_MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
            known = set(info.get("entries", [])) if info.get("written_by") == "spotune" else set()
        except (OSError, ValueError, AttributeError):
            known = set()  # an unreadable marker vouches for nothing
        known.add(OUTPUT_MARKER)
    return sorted(p.name for p in folder.iterdir() if p.name not in known)


def is_safetensors_file(path: str | Path) -> bool:
    """Whether ``path`` is a file with a readable safetensors header (the only file kind exports write)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                return False
            (size,) = struct.unpack("<Q", head)
            if size > 100_000_000:
                return False
            json.loads(fh.read(size))
        return True
    except (OSError, ValueError):
        return False


def describe_entries(folder: str | Path, names: list[str]) -> str:
    """``folder/a, folder/b, ... and N more`` for a refusal message."""
    shown = ", ".join(str(Path(folder) / n) for n in names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
