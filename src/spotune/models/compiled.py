"""Optional ``torch.compile`` of the three models an SPO iteration spends its time in.

Each model's ``forward`` (for the judge: its image tower) is replaced by a compiled version, so the
module objects, their parameters, hooks, peft adapters and accelerate's autocast wrapper stay as they
are: only the arithmetic inside the call is fused. Training with and without it computes the same
thing up to floating-point order.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_forward(module: nn.Module, backend: str = "inductor") -> nn.Module:
    """Replace ``module.forward`` by ``torch.compile(module.forward)``; returns the same module.

    The module is compiled where it is called (``module(...)`` still runs its hooks), and a second
    call is a no-op so a model is never compiled twice.
    """
    if getattr(module, "_spotune_compiled", False):
        return module
    module.forward = torch.compile(module.forward, backend=backend)
    module._spotune_compiled = True
    return module


def compile_models(unet: nn.Module, vae: nn.Module | None = None, judge: nn.Module | None = None, backend: str = "inductor") -> None:
    """Compile the UNet, the VAE's decoder and the judge's image-feature function in place.

    Args:
        unet: the (possibly LoRA-wrapped, accelerate-prepared) UNet: [B, 4, h, w] latents -> noise.
        vae: an ``AutoencoderKL``; only ``vae.decoder`` is compiled (decoding x0-predictions is its job here).
        judge: a judge with ``image_features(pixel_values [B, 3, S, S], timesteps [B]) -> [B, D]``.
        backend: the ``torch.compile`` backend (``inductor`` for speed; ``aot_eager`` compiles quickly).
    """
    compile_forward(unet, backend)
    if vae is not None:
        compile_forward(vae.decoder, backend)
    if judge is not None and not getattr(judge, "_spotune_compiled", False):
        judge.image_features = torch.compile(judge.image_features, backend=backend)
        judge._spotune_compiled = True
