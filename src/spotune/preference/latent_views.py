"""What a latent reward model sees in training: the noised latent of each image of a preference pair.

The LPO authors' LRM trainer (``lrm/lrm_15/trainer/models/sd15_preference_model.py``, ``get_image_features``)
builds, per image::

    z_i   = VAE.encode(image_i).sample() * scaling_factor       i = 0, 1
    x_t,i = sqrt(a_t) * z_i + sqrt(1 - a_t) * eps_i               each image its own noise, one t per pair

(``DDPMScheduler.add_noise``): unlike SPO's views (:mod:`spotune.preference.noisy_views`) there is no
UNet pass and no decode, and the two images do not share their noise. The clean latent is the view at
t = 0 as well: nothing here is judged on pixels.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


class LatentViewMaker:
    """Noised latents of preference pairs with a frozen VAE (``pipe.vae``) and the model's noise schedule.

    Args:
        pipe: an SD1.5 or SDXL pipeline; only its VAE and its scheduler's config are used.
    """

    # evaluate_pair_accuracy judges clean pixels at t = 0 for pixel judges; a latent judge sees latents there too.
    clean_view_at_zero = False

    def __init__(self, pipe) -> None:
        self.vae = pipe.vae
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.device = self.vae.device

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @torch.no_grad()
    def __call__(self, pixel_values_0: torch.Tensor, pixel_values_1: torch.Tensor, captions: list[str],
                 timesteps: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Noised latents of both images of B pairs at their timesteps.

        Args:
            pixel_values_0, pixel_values_1: [B, 3, R, R] images in [-1, 1].
            captions: B captions (unused: the latents do not depend on them).
            timesteps: [B] long, one per pair, in [0, num_train_timesteps).
            generator: draws the VAE posterior samples and the noise (on the VAE's device).
        Returns:
            latents_0, latents_1: [B, C, h, w] float32 noised latents, scaled by the VAE's factor.
        """
        b, vae = pixel_values_0.shape[0], self.vae
        images = torch.cat([pixel_values_0, pixel_values_1]).to(self.device, vae.dtype)  # [2B, 3, R, R]
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = (vae.encode(images).latent_dist.sample(generator=generator) - shift) * vae.config.scaling_factor
        latents = latents.float()
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)  # per image
        noisy = self.scheduler.add_noise(latents, noise, timesteps.to(latents.device).long().repeat(2))
        return noisy[:b], noisy[b:]
