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

from spotune.errors import SpotuneError, one_line

SD15_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_NAME = "default"
# Accepted lora_init values: peft's gaussian (SPO's choice), or its default kaiming-uniform A (true).
# Both start with B = 0, so the adapted UNet starts equal to the reference (the adapter off).
LORA_INITS = ("gaussian", "true", "kaiming", "default")


class LoRAConfigError(SpotuneError, ValueError):
    """LoRA settings that do not fit the UNet (targets that match nothing, an unknown init)."""


class LoRAMismatchError(SpotuneError, ValueError):
    """LoRA weights that do not fit the adapter (other targets or another rank)."""


def matching_modules(unet: torch.nn.Module, targets: Sequence[str]) -> dict[str, list[str]]:
    """For each target suffix, the names of the UNet's linear/conv modules it matches (peft's rule:
    the full name equals the target or ends with ``.`` + target)."""
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return {t: [n for n in names if n == t or n.endswith("." + t)] for t in targets}


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
    Raises:
        LoRAConfigError: ``init`` is not one of :data:`LORA_INITS`, or a target matches no module
            (checked here, so the message names the config keys rather than peft's internals).
    """
    init = str(init).lower()
    if init not in LORA_INITS:
        raise LoRAConfigError(f"lora_init={init} is not one of {', '.join(LORA_INITS)}")
    matches = matching_modules(unet, targets)
    unmatched = [t for t, found in matches.items() if not found]
    if not targets or unmatched:
        usable = [t for t, found in matching_modules(unet, SD15_LORA_TARGETS).items() if found]
        raise LoRAConfigError(
            f"lora_targets={list(targets)}: {unmatched or 'the empty list'} match(es) no linear or conv module of "
            f"the UNet; name module-name suffixes such as lora_targets=[{','.join(usable or SD15_LORA_TARGETS)}]"
        )
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights="gaussian" if init == "gaussian" else True,
        target_modules=list(targets),
    )
    try:
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    except (ValueError, TypeError, RuntimeError) as exc:  # peft's own checks, for what is not caught above
        raise LoRAConfigError(
            f"LoRA settings lora_rank={rank} lora_targets={list(targets)} lora_init={init} were refused by peft "
            f"({one_line(exc)})"
        ) from exc
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
        raise LoRAMismatchError(
            f"{source} does not fit this UNet's adapter (other lora_targets?): {len(missing)} missing key(s) "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected key(s) (e.g. {unexpected[:3]})"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            rank_hint = ""
            if "lora_A" in key or "lora_B" in key:  # A is [r, in], B is [out, r]
                file_rank = value.shape[0] if "lora_A" in key else value.shape[1]
                unet_rank = expected[key].shape[0] if "lora_A" in key else expected[key].shape[1]
                rank_hint = f" (LoRA rank {file_rank} in the file, lora_rank={unet_rank} in the config: pass lora_rank={file_rank})"
            raise LoRAMismatchError(
                f"{source}: key {key} has shape {tuple(value.shape)}, the UNet expects {tuple(expected[key].shape)}{rank_hint}"
            )
    set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)


@contextlib.contextmanager
def adapter_disabled(unet: torch.nn.Module) -> Iterator[None]:
    """Run the base (reference) UNet: LoRA layers pass through while inside the block."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
