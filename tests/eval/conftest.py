"""Fixtures for the scorer tests: a tiny CLIP saved as a model + processor folder, random images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, tiny_clip):
    """The shared tiny CLIP saved like PickScore_v1 + its processor: weights, tokenizer, preprocessor_config."""
    from transformers import CLIPImageProcessorPil

    model, tokenizer = tiny_clip
    folder = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    size = model.config.vision_config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def random_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """RGB images of the given (width, height) with smooth random content (so resizing matters)."""
    rng = np.random.default_rng(seed)
    images = []
    for w, h in sizes:
        coarse = rng.integers(0, 256, size=(max(2, h // 4), max(2, w // 4), 3), dtype=np.uint8)
        base = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
        noise = rng.integers(-20, 21, size=(h, w, 3))
        images.append(Image.fromarray(np.clip(np.asarray(base, dtype=int) + noise, 0, 255).astype(np.uint8)))
    return images


@pytest.fixture(scope="session")
def make_images():
    """``make_images(sizes, seed)`` -> PIL images (see :func:`random_images`)."""
    return random_images
