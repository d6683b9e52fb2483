"""GradSPO training (``spotune train algorithm=gradspo``): SPO's recipe with the three changes GradSPO makes.

Read :mod:`spotune.recipes.train_spo` first; this module only says what differs, checked against the
official code (JoshuaTTJ/GradSPO, ``train_scripts/train_gradspo.py`` and ``train_gradspo_sdxl.py``, the
same loop but for SDXL's conditioning and sampler):

- **an EMA model samples.** A copy of the trained UNet (with its adapter) whose trained weights follow
  ``ema = decay * ema + (1 - decay) * trained`` (GradSPO: decay 0.9). It draws the candidates, gives the
  noise-prediction anchor of the loss, and renders the validation images. The official update runs over
  every parameter of the copy, the frozen fp16 base included, where ``0.9 w + 0.1 w`` in fp16 is not
  always ``w``; here only the trained weights are averaged, in fp32. It runs when the official code runs
  it: after every training batch whose index within its sampling round, counted from 1, is a multiple of
  ``gradient_accumulation_steps`` (``(train_batch_idx + 1) % gradient_accumulation_steps == 0`` in both
  scripts). With accumulation 1 (the SD1.5 recipe) that is after every optimizer step; with the SDXL
  recipe's 4 and groups that run on across rounds, it is not always (a round of 6 batches updates the EMA
  once, after its 4th, whatever the group count says).
- **#### SAMPLING ####** keeps each pair's noise offset and the end of the chain of GradSPO's sampler of
  the model's kind (``sampler``, from the family for ``auto``: SD1.5 or SDXL;
  :func:`spotune.diffusion.gradspo_sampler.gradspo_sample`).
- **#### TRAINING ####** uses :func:`spotune.losses.gradspo_loss`: one guided pass each of the policy,
  the reference and the EMA model per tuple (winner and loser share x_t, t and the prompt).

Checkpoints hold the EMA weights too (``ema.safetensors``, same keys as ``lora.safetensors`` or
``unet.safetensors``), so a resumed run continues bit for bit; the official code saves no EMA, so its
resumed runs restart the EMA from the resumed weights. ``spotune export`` writes the trained weights by
default, as the official code releases them; ``--weights ema`` writes the EMA ones.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from spotune.checkpoint import EMA_FILE, CheckpointError, load_checkpoint_tensors
from spotune.diffusion.ddim import predict_x0_and_eps
from spotune.diffusion.gradspo_sampler import gradspo_sample
from spotune.diffusion.sampler import SamplingResult, StepPairs, guided_noise_pred, sampling_unet
from spotune.losses import gradspo_loss
from spotune.models.lora import adapter_disabled, load_lora_state_dict, lora_state_dict
from spotune.recipes.train_spo import SPOTrainer
from spotune.utils.io import atomic_save_safetensors

logger = logging.getLogger(__name__)


class GradSPOTrainer(SPOTrainer):
    """SPO's trainer with an EMA sampling model, GradSPO's sampler and GradSPO's loss.

    A subclass rather than options inside :class:`SPOTrainer`, so that SPO's own path stays as it is
    and every GradSPO difference is read in one place.
    """

    # -- the EMA model ----------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self._ensure_ema()

    def _ensure_ema(self) -> None:
        """Create the EMA copy from the trained model, once (a resume creates it before loading it)."""
        if getattr(self, "ema_unet", None) is not None:
            return
        unet = self.accelerator.unwrap_model(self.unet)
        self.ema_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        trained = dict(unet.named_parameters())
        ema = dict(self.ema_unet.named_parameters())
        # (EMA tensor, trained parameter) for every trained weight, in fp32 like the trained weights.
        self._ema_pairs = [(ema[name], p) for name, p in trained.items() if p.requires_grad]

    @torch.no_grad()
    def _after_training_batch(self, index: int) -> None:
        # The official rule counts the round's batches, not optimizer steps (module docstring).
        if index % self.config.gradient_accumulation_steps:
            return
        decay = self.config.ema_decay
        for ema, trained in self._ema_pairs:
            ema.mul_(decay).add_(trained.detach(), alpha=1 - decay)

    def _sampling_unet(self):
        return self.ema_unet

    def _ema_state_dict(self) -> dict[str, torch.Tensor]:
        if self.config.finetune == "lora":
            return {k: v.float() for k, v in lora_state_dict(self.ema_unet).items()}
        return self.ema_unet.state_dict()

    # -- checkpoints ------------------------------------------------------------------------------
    def _save_extra_weights(self, folder: Path) -> None:
        atomic_save_safetensors(self._ema_state_dict(), folder / EMA_FILE)

    def _state_dict(self) -> dict[str, Any]:
        state = super()._state_dict()
        state["ema"] = {"file": EMA_FILE, "decay": self.config.ema_decay}
        return state

    def _load_checkpoint(self, checkpoint: Path) -> None:
        super()._load_checkpoint(checkpoint)
        self._ensure_ema()
        file = checkpoint / EMA_FILE
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: a GradSPO checkpoint holds its EMA weights there "
                                  "(was the run trained with algorithm=spo?)")
        weights = load_checkpoint_tensors(checkpoint, EMA_FILE, device=str(self.accelerator.device))
        if self.config.finetune == "lora":
            load_lora_state_dict(self.ema_unet, weights, source=str(file))
        else:
            self.ema_unet.load_state_dict(weights)
        for ema, _ in self._ema_pairs:
            ema.data = ema.data.float()

    # ============================================================================================
    #### SAMPLING ####
    # ============================================================================================
    @torch.no_grad()
    def sample(self, prompts: list[str], tree_row: int | None = None) -> SamplingResult:
        """GradSPO's step-wise sampling with the EMA model; pairs carry ``noise_delta`` (and the tree of
        prompt ``tree_row``, when given)."""
        cfg, acc = self.config, self.accelerator
        generator, cond, latents = self._round_inputs(prompts)  # x_T: [b, 4, h, w]
        with acc.autocast():
            return gradspo_sample(
                sampling_unet(self.ema_unet, cfg.sample_micro_batch_size), self.vae, self.scheduler, self.judge, prompts,
                cond, self.negative, latents,
                num_inference_steps=cfg.num_inference_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
                divert_start_step=cfg.divert_start_step, num_candidates=cfg.num_samples_per_step,
                threshold=cfg.preference_threshold, ending=self.sampler_kind, generator=generator,
                decode_chunk_size=cfg.decode_chunk_size, judge_batch_size=cfg.judge_batch_size, tree_row=tree_row,
            )

    # ============================================================================================
    #### TRAINING ####
    # ============================================================================================
    def _pair_loss(self, batch: StepPairs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """GradSPO loss of a micro-batch: guided passes of policy, reference and EMA at the shared x_t."""
        cfg, acc = self.config, self.accelerator
        x_t, t, cond = batch.latents, batch.timesteps, batch.cond  # [n,4,h,w], [n], n rows
        with acc.autocast():
            with torch.no_grad():
                out_ema = guided_noise_pred(self.ema_unet, x_t, t, cond, self.negative, cfg.guidance_scale)
                if self.reference_unet is None:
                    base = acc.unwrap_model(self.unet)
                    with adapter_disabled(base):
                        out_ref = guided_noise_pred(base, x_t, t, cond, self.negative, cfg.guidance_scale)
                else:
                    out_ref = guided_noise_pred(self.reference_unet, x_t, t, cond, self.negative, cfg.guidance_scale)
            out = guided_noise_pred(self.unet, x_t, t, cond, self.negative, cfg.guidance_scale)
        # Epsilon predictions (the identity for SD1.5's epsilon models), [n, 4, h, w] float32.
        eps_policy, eps_ref, eps_ema = (predict_x0_and_eps(self.scheduler, o, t, x_t)[1] for o in (out, out_ref, out_ema))
        alphas_cumprod_t = self.scheduler.alphas_cumprod.to(x_t.device)[t].float()  # [n]
        return gradspo_loss(eps_policy, eps_ref, eps_ema, batch.noise_delta, alphas_cumprod_t,
                            cfg.beta, cfg.eps, cfg.grad_scale)
