"""Helpers of the export tests: a tiny model with SD1.5's block structure, a UNet probe, hand-written runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from spotune.checkpoint import CHECKPOINT_FORMAT
from spotune.models.tiny import build_tiny_text_encoder, build_tiny_tokenizer, sd15_ddim_scheduler

LORA_RANK = 4
LORA_ALPHA = 2.0  # alpha != rank, so a lost alpha shows as a wrong output


def build_sd15_structured_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD1.5's blocks at toy width: 4 down blocks (3 with cross-attention), 2 layers each, 4-level VAE."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=32,
    )
    tokenizer = build_tiny_tokenizer()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=build_tiny_text_encoder(tokenizer, seed + 1),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd15_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@dataclass
class UNetProbe:
    """Fixed UNet inputs: latents [2, 4, 8, 8], timesteps [2], text states [2, 77, 32]."""

    sample: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor

    @torch.no_grad()
    def __call__(self, unet: torch.nn.Module) -> torch.Tensor:
        unet = unet.float().eval()
        return unet(self.sample, self.timesteps, self.text).sample


def write_checkpoint(run: Path, iteration: int, finetune: str, base: str, files: dict[str, dict]) -> Path:
    ckpt = run / "checkpoints" / f"iter-{iteration:08d}"
    ckpt.mkdir(parents=True)
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(ckpt / name))
    lora = {"rank": LORA_RANK, "alpha": LORA_ALPHA, "targets": ["to_q", "to_k", "to_v", "to_out.0"], "init": "gaussian"}
    state = {
        "format": CHECKPOINT_FORMAT,
        "iteration": iteration,
        "optimizer_step": iteration * 2,
        "finetune": finetune,
        "lora": lora if finetune == "lora" else None,
        "base_model": base,
        "config": {"resolution": 32, "finetune": finetune},
    }
    (ckpt / "state.json").write_text(json.dumps(state))
    return ckpt


@dataclass
class TrainedRun:
    run: Path
    checkpoint: Path
    expected: torch.Tensor  # the trained UNet's output on the probe
    base_output: torch.Tensor  # the base UNet's output on the probe
    lora: dict[str, torch.Tensor] | None


@dataclass
class SDXLProbe:
    """Fixed inputs of a tiny SDXL UNet: latents [2, 4, 8, 8], timesteps [2], text states [2, 77, 64],
    pooled text [2, 32] and time ids [2, 6] (what its ``added_cond_kwargs`` take)."""

    sample: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor

    @torch.no_grad()
    def __call__(self, unet: torch.nn.Module) -> torch.Tensor:
        unet = unet.float().eval()
        extra = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return unet(self.sample, self.timesteps, self.text, added_cond_kwargs=extra).sample


def randomise_lora(unet: torch.nn.Module, seed: int, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Give every LoRA parameter of ``unet`` a nonzero random value; returns the peft state dict."""
    from spotune.models.lora import lora_state_dict

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(scale * torch.randn(param.shape, generator=g))
    return {k: v.detach().clone() for k, v in lora_state_dict(unet).items()}
