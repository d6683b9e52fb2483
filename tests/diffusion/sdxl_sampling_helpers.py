"""What the SDXL sampler tests share: a UNet wrapper that counts batch rows, and a batch's inputs."""

from __future__ import annotations

import torch


class CountingUNet(torch.nn.Module):
    """Records the batch size of every UNet call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.batches = unet, []
        self.config = unet.config

    def forward(self, x, t, **kwargs):
        self.batches.append(x.shape[0])
        return self.unet(x, t, **kwargs)


def sdxl_inputs(pipe, b: int, seed: int):
    """(prompts, conditioning, negative, x_T [b, 4, 8, 8], generator) for b prompts of the tiny SDXL pipeline."""
    from spotune.models.family import SDXL

    conditioner = SDXL.conditioner(pipe)
    prompts = [f"prompt {i}" for i in range(b)]
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, 4, 8, 8, generator=g)
    return prompts, conditioner.encode(prompts), conditioner.negative(""), latents, g
