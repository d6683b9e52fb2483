"""Fixtures for the judges: a tiny CLIP saved as a folder, as a user's PickScore folder would be."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These models are tiny: one thread is as fast alone and far faster when other jobs share the
    cores (an OpenMP region waits for every thread, and a descheduled one costs a whole time slice)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """The tiny CLIPModel (seed 0) and its tokenizer written with save_pretrained."""
    from spotune.models.tiny import build_tiny_clip

    model, tokenizer = build_tiny_clip()
    folder = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def make_images():
    """make_images(n, size=32, seed=0) -> [n, 3, size, size] random images in [-1, 1]."""

    def make(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
        return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    return make
