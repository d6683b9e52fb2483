"""Fixtures for the export tests: a tiny model with SD1.5's block structure and runs trained on it.

The runs are written by hand in the layout of :mod:`spotune.checkpoint` (state.json + lora.safetensors
or unet.safetensors) with nonzero random LoRA values, so the exports have something to carry.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from export_helpers import (
    LORA_ALPHA,
    LORA_RANK,
    SDXLProbe,
    TrainedRun,
    UNetProbe,
    build_sd15_structured_pipeline,
    randomise_lora,
    write_checkpoint,
)
from spotune.models.lora import add_lora, lora_state_dict


@pytest.fixture(scope="session")
def probe() -> UNetProbe:
    g = torch.Generator().manual_seed(123)
    return UNetProbe(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([20, 700]), torch.randn(2, 77, 32, generator=g))


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """The SD1.5-structured tiny pipeline as a diffusers folder: the base model of every run here."""
    folder = tmp_path_factory.mktemp("sd15-structured") / "base"
    build_sd15_structured_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, base_dir, probe) -> TrainedRun:
    """A run with two checkpoints; the latest holds nonzero random LoRA values (rank 4, alpha 2)."""
    run = tmp_path_factory.mktemp("runs") / "lora-run"
    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    base_output = probe(unet)
    add_lora(unet, rank=LORA_RANK, alpha=LORA_ALPHA)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=g))
    weights = {k: v.detach().clone() for k, v in lora_state_dict(unet).items()}
    write_checkpoint(run, 5, "lora", str(base_dir), {"lora.safetensors": {k: 0 * v for k, v in weights.items()}})
    latest = write_checkpoint(run, 10, "lora", str(base_dir), {"lora.safetensors": weights})
    return TrainedRun(run, latest, probe(unet), base_output, weights)


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, base_dir, probe) -> TrainedRun:
    """A full fine-tune run: every UNet weight of the base moved a little."""
    run = tmp_path_factory.mktemp("runs") / "full-run"
    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    base_output = probe(unet)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=g))
    ckpt = write_checkpoint(run, 3, "full", str(base_dir), {"unet.safetensors": unet.state_dict()})
    return TrainedRun(run, ckpt, probe(unet), base_output, None)


# -- SDXL -------------------------------------------------------------------------------------------

TINY_SDXL = "builtin:tiny-sdxl"


@pytest.fixture(scope="session")
def sdxl_probe() -> SDXLProbe:
    g = torch.Generator().manual_seed(321)
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(2, 1)
    return SDXLProbe(
        torch.randn(2, 4, 8, 8, generator=g), torch.tensor([20, 700]), torch.randn(2, 77, 64, generator=g),
        torch.randn(2, 32, generator=g), time_ids,
    )


@pytest.fixture(scope="session")
def sdxl_lora_run(tmp_path_factory, sdxl_probe) -> TrainedRun:
    """A run on ``builtin:tiny-sdxl`` whose checkpoint holds nonzero random LoRA values (rank 4, alpha 2)."""
    from spotune.models.loading import load_pipeline

    run = tmp_path_factory.mktemp("runs") / "sdxl-run"
    unet = load_pipeline(TINY_SDXL).unet
    base_output = sdxl_probe(unet)
    add_lora(unet, rank=LORA_RANK, alpha=LORA_ALPHA)
    weights = randomise_lora(unet, seed=11)
    latest = write_checkpoint(run, 4, "lora", TINY_SDXL, {"lora.safetensors": weights})
    return TrainedRun(run, latest, sdxl_probe(unet), base_output, weights)
