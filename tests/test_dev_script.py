"""./dev, the README's entry point: a bad setting is one line and exit 2, before any test runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAMP = ROOT / ".venv" / ".spotune-installed"


@pytest.mark.skipif(not STAMP.is_file() or STAMP.stat().st_mtime < (ROOT / "pyproject.toml").stat().st_mtime,
                    reason="./dev would set up .venv first (it is set up by ./dev test itself)")
def test_a_worker_count_that_is_not_a_number_is_one_line():
    env = {**os.environ, "SPOTUNE_TEST_WORKERS": "two"}
    proc = subprocess.run([str(ROOT / "dev"), "test", "tests/test_dev_script.py"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "./dev test: SPOTUNE_TEST_WORKERS must be a whole number of workers (1: one process), got 'two'"
