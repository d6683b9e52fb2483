"""Headless Chromium for the tests of spotune's HTML pages (the evaluation report, the run page)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image


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


def rendered_dom(chromium: str, profile, url: str) -> str:
    """The page's DOM after its scripts ran (``--dump-dom``)."""
    dom = run_chromium(chromium, profile, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout


def image_status(html: str) -> tuple[int, int, str]:
    """(images loaded, images in all, the status sentence) that spotune's image-status script wrote."""
    status = re.search(r'<p id="image-status"([^>]*)>([^<]*)</p>', html)
    loaded = int(re.search(r'data-loaded="(\d+)"', status.group(1)).group(1))
    total = int(re.search(r'data-total="(\d+)"', status.group(1)).group(1))
    return loaded, total, status.group(0)


def screenshot_pixels(chromium: str, profile, url: str, shot) -> np.ndarray:
    """[H, W, 3] int16 pixels of a screenshot of the page (written to ``shot``)."""
    run = run_chromium(chromium, profile, f"--screenshot={shot}", url)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    with Image.open(shot) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)
