"""LPO training (``spotune train algorithm=lpo``): SPO's recipe, sampled with LPO's latent judge.

Read :mod:`spotune.recipes.train_spo` first; this module says what differs, checked against the authors'
code (Kwai-Kolors/LPO, ``lpo/train_scripts/train_lpo.py`` and ``train_lpo_sdxl.py``):

- **the judge** is a latent reward model (``judge=lrm``, :mod:`spotune.preference.lrm`) of the trained
  model's own family, which scores the noisy candidates without decoding them;
- **#### SAMPLING ####** is LPO's sampler (:func:`spotune.diffusion.lpo_sampler.lpo_sample`): one UNet pass
  per step on the b chains, k candidates from its DDIM mean, the LRM's scores at the drawing step's t
  (``lrm_timestep``), a threshold that rises with the step's DDIM standard deviation from
  ``lpo_threshold_min`` to ``lpo_threshold_max``, and the chain continued from a random candidate. SD1.5 and
  SDXL sample alike (the authors' SDXL code has no segments);
- **#### TRAINING ####** is SPO's: the authors' loss lines are SPO's (clipped likelihood ratios, beta 500 in
  their configs, the log-density averaged over C, H, W). Their reference is a frozen copy of the base UNet
  made before the adapter is added; a LoRA run here uses the adapter switched off, the same function.

Checkpoints, resume, several processes, exports, validation images, trees and logs are SPO's; the
per-step statistics carry the step's threshold.
"""

from __future__ import annotations

import torch

from spotune.diffusion.lpo_sampler import lpo_sample
from spotune.diffusion.sampler import SamplingResult, sampling_unet
from spotune.preference.lrm import check_judges_family
from spotune.recipes.train_spo import SPOTrainer


class LPOTrainer(SPOTrainer):
    """SPO's trainer with LPO's latent judge and sampler (see the module docstring)."""

    def setup(self) -> None:
        super().setup()
        check_judges_family(self.judge, self.family.name == "sdxl", self.config.judge_checkpoint, self.config.pretrained_model)

    @torch.no_grad()
    def sample(self, prompts: list[str], tree_row: int | None = None) -> SamplingResult:
        """LPO's step-wise sampling with the current model; returns a :class:`SamplingResult`."""
        cfg, acc = self.config, self.accelerator
        unet = acc.unwrap_model(self.unet)
        unet.eval()
        generator, cond, latents = self._round_inputs(prompts)  # x_T: [b, 4, h, w]
        with acc.autocast():
            return lpo_sample(
                sampling_unet(unet, cfg.sample_micro_batch_size), self.vae, self.scheduler, self.judge, prompts, cond,
                self.negative, latents, num_inference_steps=cfg.num_inference_steps, eta=cfg.eta,
                guidance_scale=cfg.guidance_scale, divert_start_step=cfg.divert_start_step,
                num_candidates=cfg.num_samples_per_step, threshold_range=(cfg.lpo_threshold_min, cfg.lpo_threshold_max),
                judge_timestep=cfg.lrm_timestep, generator=generator, decode_chunk_size=cfg.decode_chunk_size,
                judge_batch_size=cfg.judge_batch_size, tree_row=tree_row,
            )
