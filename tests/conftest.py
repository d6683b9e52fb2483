"""Shared fixtures: tiny SD1.5-architecture components and a tiny CLIP judge, built in code, seeded."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never download and never use more threads than CI's two cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread: tiny models gain nothing from more, and on a loaded 2-core machine two threads per
# process made tiny-model tests tens of times slower.
torch.set_num_threads(1)
# Processes a test starts (the CLI under SIGTERM, accelerate's workers) take one thread too: ./dev test runs two
# pytest workers side by side, and a third thread on 2 cores makes every OpenMP region wait for a busy core.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Give the next test one thread again, whatever this one set (the demo's ``threads=2`` sets torch's count
    for its process, which outlives the test in a pytest worker)."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny SD1.5-architecture pipeline saved as a diffusers folder."""
    from spotune.models.tiny import build_tiny_sd15_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd15")
    build_tiny_sd15_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture()
def tiny_pipeline():
    """A fresh tiny SD1.5-architecture pipeline (fp32, CPU, DDIM), safe to modify."""
    from spotune.models import BUILTIN_TINY_SD15, load_pipeline

    return load_pipeline(BUILTIN_TINY_SD15)


@pytest.fixture(scope="session")
def tiny_clip():
    """A tiny random CLIPModel and its tokenizer (do not modify: shared across tests)."""
    from spotune.models.tiny import build_tiny_clip

    return build_tiny_clip()


@pytest.fixture(scope="session")
def shared_data_dir():
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"shared data folder {path} not present")
    return path


@pytest.fixture()
def sigterm_during(monkeypatch):
    """``sigterm_during(cls, "method", when)``: SIGTERM this process once, as ``cls.method`` starts on the first
    call where ``when(self)`` is true, as a scheduler preempting the job would (the handler the CLI or the training
    loop installed then runs, in the main thread, at the next bytecode)."""
    import signal

    def arm(cls, method: str, when) -> None:
        original = getattr(cls, method)
        fired = []

        def wrapped(self, *args, **kwargs):
            if not fired and when(self):
                fired.append(True)
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, wrapped)

    return arm
