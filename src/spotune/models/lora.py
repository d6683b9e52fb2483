"""LoRA on the UNet's attention projections, through diffusers' own peft integration.

Using ``unet.add_adapter`` (not a peft wrapper model) keeps module names identical to the base
UNet's, so ``get_peft_model_state_dict`` gives keys diffusers' ``load_lora_weights`` understands and
the kohya/webui export is a pure renaming. The frozen reference model of SPO is the same UNet with
the adapter switched off (:func:`adapter_disabled`), so no second UNet lives in memory.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

SD15_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_NAME = "default"


def add_lora(
    unet: UNet2DConditionModel,
    rank: int = 4,
    alpha: float | None = None,
    targets: Sequence[str] = SD15_LORA_TARGETS,
    init: str = "gaussian",
) -> LoraConfig:
    """Freeze ``unet`` and add a trainable LoRA adapter to the named attention projections.

    Args:
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by alpha / r. ``None`` means alpha = r (scale 1).
        targets: module-name suffixes to adapt (SD1.5 recipe: to_q, to_k, to_v, to_out.0).
        init: peft's ``init_lora_weights``: "gaussian" (SPO), True (kaiming), ...
    Returns:
        The :class:`LoraConfig` used.
    """
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights=True if init in ("true", "default", "kaiming") else init,
        target_modules=list(targets),
    )
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    return config


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters (lora_A / lora_B) of ``unet``, in module order."""
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights with diffusers module names and no adapter name (``...to_q.lora_A.weight``)."""
    return get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)


def load_lora_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "LoRA") -> None:
    """Load a :func:`lora_state_dict` into a UNet that already has the adapter; every key must match."""
    expected = lora_state_dict(unet)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit this UNet: {len(missing)} missing key(s) (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[:3]})"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{source}: key {key} has shape {tuple(value.shape)}, the UNet expects {tuple(expected[key].shape)}")
    set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)


@contextlib.contextmanager
def adapter_disabled(unet: torch.nn.Module) -> Iterator[None]:
    """Run the base (reference) UNet: LoRA layers pass through while inside the block."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
