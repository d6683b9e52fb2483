"""Same-seed image generation for the miniature world (pre-training checks, preference data, evaluation).

Each image's starting noise comes from its own generator seeded with that image's seed, so image i
of a base model and image i of a fine-tuned model start from the same x_T whatever the batch size:
that is what makes a *same-seed* comparison.
"""

from __future__ import annotations

from typing import Callable

import torch

from spotune.diffusion.sampler import ddim_sample, decode_latents
from spotune.models.conditioning import Conditioning
from spotune.models.text import encode_prompts


def initial_noise(seeds: list[int], shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, *shape] standard normal noise, row i drawn from a generator seeded with ``seeds[i]``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds])


@torch.no_grad()
def generate(
    unet,
    vae,
    text_encoder,
    tokenizer,
    scheduler,
    captions: list[str],
    seeds: list[int],
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    eta: float = 0.0,
    batch_size: int = 64,
    on_x0_prediction: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Guided DDIM samples of ``captions``, one per seed.

    Args:
        unet, vae, text_encoder, tokenizer, scheduler: an SD1.5-family pipeline's parts (eval mode).
        captions, seeds: B captions and B integer seeds.
        eta: DDIM eta (0: deterministic given x_T; > 0 draws step noise from a generator seeded with
            the batch's first seed).
        on_x0_prediction: called with each step's timestep and [b, C, h, w] x0-prediction latents, batch
            by batch (e.g. a :class:`spotune.toyworld.properties.X0Recorder`).
    Returns:
        [B, 3, H, W] float32 images in about [-1, 1].
    """
    if len(captions) != len(seeds):
        raise ValueError(f"{len(captions)} captions but {len(seeds)} seeds")
    device = unet.device
    size = unet.config.sample_size
    shape = (unet.config.in_channels, size, size)
    negative = Conditioning(encode_prompts(tokenizer, text_encoder, [""], device))
    out = []
    for start in range(0, len(captions), batch_size):
        caps, sds = captions[start : start + batch_size], seeds[start : start + batch_size]
        embeds = Conditioning(encode_prompts(tokenizer, text_encoder, caps, device))
        latents = initial_noise(sds, shape).to(device, unet.dtype) * scheduler.init_noise_sigma
        generator = torch.Generator(device).manual_seed(int(sds[0])) if eta > 0 else None
        x0 = ddim_sample(unet, scheduler, embeds, negative, latents, num_inference_steps=num_inference_steps,
                         eta=eta, guidance_scale=guidance_scale, generator=generator, on_x0_prediction=on_x0_prediction)
        out.append(decode_latents(vae, x0, chunk_size=batch_size).float().cpu())
    return torch.cat(out)


def generate_with_pipeline(pipe, captions: list[str], seeds: list[int], **kwargs) -> torch.Tensor:
    """:func:`generate` with the parts of a loaded pipeline."""
    return generate(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, captions, seeds, **kwargs)
