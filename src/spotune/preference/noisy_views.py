"""What a step-aware preference model sees: the decoded x0-prediction of a noised image at step t.

SPO trains and evaluates its SPM on views built like this, per preference pair (both images share
the noise, so the pair differs only in content)::

    z_i   = VAE.encode(image_i).sample() * scaling_factor          i = 0, 1
    x_t,i = sqrt(a_t) * z_i + sqrt(1 - a_t) * eps                   one eps for the pair
    e_i   = uncond + w * (cond - uncond)                            guided UNet, w = 5, negative prompt ""
    x0_i  = (x_t,i - sqrt(1 - a_t) * e_i) / sqrt(a_t)               a full-schedule DDIM step's x0-prediction
    view  = VAE.decode(x0_i / scaling_factor)                       in about [-1, 1]

The x0-prediction is that of ``DDIMScheduler.step`` after ``set_timesteps(1000)`` (SPO's batchable
DDIM scheduler), which is the scheduler's ``pred_original_sample``: with SD1.5's config
(``clip_sample`` off) the formula above, with clipping or thresholding where a config asks for it.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from spotune.diffusion.ddim import predict_x0_and_eps
from spotune.diffusion.sampler import decode_latents, guided_noise_pred
from spotune.models.family import family_of


class NoisyViewMaker:
    """Builds x0-prediction views with a frozen diffusion pipeline.

    Args:
        pipe: an SD1.5 or SDXL pipeline (``vae``, ``unet``, its text encoders and tokenizers, ``scheduler``),
            already on its device and dtype; it is not modified.
        guidance_scale: classifier-free guidance of the x0-prediction (SPO: 5.0).
        negative_prompt: the unconditional prompt (SPO: "").
        decode_chunk_size: latents decoded by the VAE at once.
        resolution: the size of the images the views are made of; SDXL's time ids say it (SPO's SDXL SPM:
            (1024, 1024, 0, 0, 1024, 1024)). The model's native size when ``None``.

    The VAE runs in its own dtype (SDXL's fp16-fix VAE in fp16, the original SDXL VAE in fp32 under an
    fp16 UNet), the UNet in its own: latents are cast on the way in and out.
    """

    def __init__(
        self,
        pipe,
        guidance_scale: float = 5.0,
        negative_prompt: str = "",
        decode_chunk_size: int = 8,
        resolution: int | None = None,
    ) -> None:
        self.vae, self.unet = pipe.vae, pipe.unet
        # The pipeline's own family decides how captions condition its UNet (SDXL: pooled, time ids at the
        # views' resolution, an empty negative prompt as zeros).
        self.family = family_of(pipe)
        self.conditioner = self.family.conditioner(pipe, resolution)
        # A scheduler of our own: set_timesteps(1000) must not change the pipeline's sampler.
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(self.scheduler.config.num_train_timesteps)
        self.guidance_scale = guidance_scale
        self.decode_chunk_size = decode_chunk_size
        self.device = self.unet.device
        self.negative = self.conditioner.negative(negative_prompt, self.device)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @torch.no_grad()
    def __call__(
        self,
        pixel_values_0: torch.Tensor,
        pixel_values_1: torch.Tensor,
        captions: list[str],
        timesteps: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of both images of B pairs at their timesteps.

        Args:
            pixel_values_0, pixel_values_1: [B, 3, R, R] images in [-1, 1].
            captions: B captions (the UNet's condition).
            timesteps: [B] long, in [0, num_train_timesteps).
            generator: draws the VAE posterior samples and the noise (on the pipeline's device).
        Returns:
            views_0, views_1: [B, 3, R, R] float32 decoded x0-predictions, about [-1, 1].
        """
        b = pixel_values_0.shape[0]
        vae, device = self.vae, self.device
        images = torch.cat([pixel_values_0, pixel_values_1]).to(device, vae.dtype)  # [2B, 3, R, R]
        posterior = vae.encode(images).latent_dist
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = (posterior.sample(generator=generator) - shift) * vae.config.scaling_factor  # [2B, 4, h, w]
        noise = torch.randn(
            (b, *latents.shape[1:]), generator=generator, device=device, dtype=latents.dtype
        ).repeat(2, 1, 1, 1)  # one noise per pair, shared by both images
        t = timesteps.to(device).long().repeat(2)  # [2B]
        x_t = self.scheduler.add_noise(latents, noise, t)
        cond = self.conditioner.encode(list(captions), device).repeat(2)  # 2B rows, both images of a pair alike
        out = guided_noise_pred(self.unet, x_t.to(self.unet.dtype), t, cond, self.negative, self.guidance_scale)
        x0, _ = predict_x0_and_eps(self.scheduler, out, t, x_t)  # [2B, 4, h, w] float32
        views = decode_latents(vae, x0, self.decode_chunk_size).float()
        return views[:b], views[b:]
