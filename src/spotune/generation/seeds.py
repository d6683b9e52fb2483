"""Seeds and starting noise that depend only on (base seed, prompt index, image index).

Two models compared "on identical noise" must start every image from the same latent, whatever the
batch size, the device or the order in which images are made. So each image gets its own seed,
derived by hashing (base seed, prompt index, image index), and its own CPU generator; the noise is
drawn on the CPU in float32 and only then moved to the model's device and dtype.
"""

from __future__ import annotations

import hashlib

import torch

SEED_BITS = 32  # webui-sized seeds: they fit the "Seed" field of any tool that reads PNG parameters


def derive_seed(base_seed: int, prompt_index: int, image_index: int, purpose: str = "latents") -> int:
    """A 32-bit seed for one image, stable across runs, machines and Python versions.

    Args:
        base_seed: the run's seed.
        prompt_index, image_index: which image (0-based).
        purpose: separates independent streams of the same image (``"latents"`` for the starting
            noise, ``"sampler"`` for DDIM's per-step noise when eta > 0).
    """
    if prompt_index < 0 or image_index < 0:
        raise ValueError(f"indices must be non-negative, got prompt {prompt_index}, image {image_index}")
    digest = hashlib.sha256(f"spotune:{purpose}:{base_seed}:{prompt_index}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (1 << SEED_BITS)


def initial_latents(
    seeds: list[int], shape: tuple[int, int, int], device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal starting latents, one generator per seed.

    Args:
        seeds: B image seeds.
        shape: (C, h, w) of one latent (4, height / 8, width / 8 for SD1.5).
    Returns:
        [B, C, h, w] on ``device`` in ``dtype``.
    """
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


def sampler_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image for the sampler's own noise (DDIM with eta > 0)."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]
