"""The interface between the SPO sampler and whatever judges its candidates."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class PreferenceModel(Protocol):
    """Anything that scores images for prompts at a denoising timestep.

    The SPO sampler calls ``score`` once per denoising step with every candidate of every prompt.
    A step-aware model uses ``timesteps``; a plain one (PickScore) ignores them.
    """

    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
        """Score a batch.

        Args:
            images: decoded images in [-1, 1], shape [B, 3, H, W].
            prompts: B captions, one per image.
            timesteps: [B] the diffusion timestep each image's latent lives at (0 for final images).
        Returns:
            [B] float scores, higher is preferred.
        """
        ...
