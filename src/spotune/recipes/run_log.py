"""The run's JSON log, ``RUN/logs/metrics.jsonl``: one line per iteration, whatever tracker is chosen.

Each line is one JSON object with the iteration's metrics (the ones TensorBoard gets) and its per-step
statistics (``per_step``, :mod:`spotune.recipes.step_stats`). A resumed run writes a ``{"event":
"resume", "iteration": N}`` line first: the iterations after N that the stopped run logged are redone,
so a reader drops them (:func:`read_metrics`). Lines are appended one ``write`` each and flushed; a
crash can cut only the last one, which the reader skips.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

METRICS_FILE = Path("logs") / "metrics.jsonl"


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def append_record(output_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one line to the run's metrics log (main process only)."""
    path = Path(output_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_clean({"time": round(time.time(), 3), **record}), sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()


def log_iteration(output_dir: str | Path, iteration: int, metrics: dict[str, float], per_step: dict[str, list]) -> None:
    append_record(output_dir, {"iteration": iteration, **metrics, "per_step": per_step})


def log_resume(output_dir: str | Path, iteration: int) -> None:
    append_record(output_dir, {"event": "resume", "iteration": iteration})


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The log's iteration records, one per iteration in order, as the run that exists now did them."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            continue
        if record.get("event") == "resume":
            records = {i: r for i, r in records.items() if i <= record["iteration"]}
        else:
            records[record["iteration"]] = record
    return [records[i] for i in sorted(records)]
