"""A LoRA's UNet module names in diffusers' layout or the original (LDM/sgm) one, and which family it is for.

kohya writes SDXL LoRAs with the sgm UNet's module names (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``)
where diffusers and spotune name the same module ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``.
The renaming is the module-prefix rules of :mod:`spotune.export.original_layout`, derived from the UNet
config (input block = 1 + level * (layers + 1) + layer, ...), so it holds for any SDXL-shaped UNet: the
tiny test model and SDXL base alike. Only the block prefix changes; inside a transformer block both
layouts use the same names.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping

from spotune.export.lora_files import LoraFormatError, LoraWeights
from spotune.export.naming import PEFT_A, PEFT_B
from spotune.export.original_layout import OriginalLayoutError, original_module_names, unet_rules
from spotune.models.family import SD15, SDXL, ModelFamily

DIFFUSERS_LAYOUT = "diffusers"
ORIGINAL_LAYOUT = "original"
_LATER_TRANSFORMER_LAYER = re.compile(r"\.transformer_blocks\.([1-9]\d*)\.")
# attn2.to_k reads the text conditioning: its input width is the family's cross-attention width.
_CROSS_ATTENTION_WIDTH = {768: SD15, 2048: SDXL}


def sdxl_base_unet_config() -> dict[str, Any]:
    """SDXL base 1.0's UNet config as shipped (the names of a bare SDXL LoRA file are read against it)."""
    from spotune.models.single_file_sdxl import sdxl_resources

    return json.loads((sdxl_resources() / "unet" / "config.json").read_text())


def _renamed(weights: LoraWeights, names: Mapping[str, str], layout: str) -> LoraWeights:
    state = {}
    for module in weights.modules:
        for part in (PEFT_A, PEFT_B):
            state[f"{names[module]}.{part}"] = weights.state_dict[f"{module}.{part}"]
    alphas = {names[m]: a for m, a in weights.alphas.items() if m in names}
    return dataclasses.replace(weights, state_dict=state, alphas=alphas, layout=layout)


def to_original_layout(weights: LoraWeights, unet_config: Mapping[str, Any]) -> LoraWeights:
    """The same LoRA with original-layout module names (kohya's SDXL naming); unchanged if already so.

    Raises:
        LoraFormatError: a module the original layout has no place for, naming the file.
    """
    if weights.layout == ORIGINAL_LAYOUT:
        return weights
    try:
        names = original_module_names(weights.modules, unet_config)
    except OriginalLayoutError as exc:
        raise LoraFormatError(f"{weights.source}: {exc}") from exc
    return _renamed(weights, names, ORIGINAL_LAYOUT)


def diffusers_module_names(modules, unet_config: Mapping[str, Any]) -> dict[str, str]:
    """Original-layout module name -> diffusers module name (the inverse of ``original_module_names``).

    Raises:
        OriginalLayoutError: a name that no block of this UNet config has.
    """
    rules = sorted(unet_rules(unet_config), key=lambda r: len(r.original), reverse=True)
    out = {}
    for module in modules:
        for rule in rules:
            if module == rule.original:
                out[module] = rule.diffusers
                break
            if module.startswith(rule.original + "."):
                rest = module[len(rule.original) + 1 :]
                for src, dst in rule.inner.items():
                    if rest == dst or rest.startswith(dst + "."):
                        rest = src + rest[len(dst) :]
                        break
                out[module] = f"{rule.diffusers}.{rest}"
                break
        else:
            raise OriginalLayoutError(
                f"module {module} is in no block of this UNet (config with {len(unet_config['down_block_types'])} "
                f"levels, layers_per_block {unet_config['layers_per_block']})"
            )
    return out


def to_diffusers_layout(weights: LoraWeights, unet_config: Mapping[str, Any]) -> LoraWeights:
    """The same LoRA with diffusers module names; unchanged if already so.

    Raises:
        LoraFormatError: a module name that this UNet config has no block for, naming the file.
    """
    if weights.layout == DIFFUSERS_LAYOUT:
        return weights
    try:
        names = diffusers_module_names(weights.modules, unet_config)
    except OriginalLayoutError as exc:
        raise LoraFormatError(f"{weights.source}: {exc}") from exc
    return _renamed(weights, names, DIFFUSERS_LAYOUT)


def lora_family(weights: LoraWeights) -> tuple[ModelFamily | None, str]:
    """Which family a LoRA was trained on, from its names and shapes, with the evidence in words.

    SDXL: original-layout names (kohya's SDXL files), a transformer block past the first
    (``transformer_blocks.1``: SD1.5 has one per attention), or cross-attention keys 2048 wide.
    SD1.5: attention at the first level (``down_blocks.0.attentions``, which SDXL does not have) or
    cross-attention 768 wide. ``(None, "")`` when nothing tells (a LoRA on a few modules of a tiny model).
    """
    if weights.layout == ORIGINAL_LAYOUT:
        return SDXL, "its module names are the original SDXL layout (input_blocks_...)"
    for module in weights.modules:
        if module.endswith("attn2.to_k"):
            width = int(weights.state_dict[f"{module}.{PEFT_A}"].shape[1])
            if width in _CROSS_ATTENTION_WIDTH:
                return _CROSS_ATTENTION_WIDTH[width], f"its cross-attention keys read {width}-wide text states"
    later = next((m for m in weights.modules if _LATER_TRANSFORMER_LAYER.search(m + ".")), None)
    if later is not None:
        return SDXL, f"it adapts {later}, a second transformer layer, which SD1.5 does not have"
    first = next((m for m in weights.modules if m.startswith("down_blocks.0.attentions.")), None)
    if first is not None:
        return SD15, f"it adapts {first}, attention at the first level, which SDXL does not have"
    return None, ""
