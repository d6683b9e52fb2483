"""Headless Chromium for the tests of spotune's HTML pages (the evaluation report, the run page)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def find_chromium() -> str:
    """Debian's chromium; a machine that could install it but did not is a setup failure, not a skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail("chromium is missing although this machine can install it: run ./dev setup (it apt-get installs chromium)")
    reason = "browser test skipped: chromium is not installed and cannot be installed here (needs root and apt-get: apt-get install chromium)"
    print(reason)
    pytest.skip(reason)


def run_chromium(chromium: str, profile, *args: str, height: int = 2400) -> subprocess.CompletedProcess:
    """Run headless Chromium (no network, a fresh profile) with ``args``, e.g. ``--dump-dom URL``."""
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        f"--user-data-dir={profile}", f"--window-size=1200,{height}", "--virtual-time-budget=10000",
    ]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120)
