"""LoRA key names in the three conventions spotune reads and writes.

* peft (spotune's own, inside checkpoints): ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` with
  diffusers module names, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``.
* diffusers (``pytorch_lora_weights.safetensors``): the same with a ``unet.`` prefix.
* kohya / webui: ``lora_unet_<module with dots as underscores>.{lora_down.weight,lora_up.weight,alpha}``;
  lora_down is peft's lora_A [r, in], lora_up is lora_B [out, r]. A1111 splits a key at its first
  dot, so the module part must carry none. For SD1.5 the module is diffusers'; for SDXL kohya writes the
  original (sgm) UNet's module (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), renamed
  by :mod:`spotune.export.lora_layout`.

Going from diffusers to kohya is a plain character swap and works for any module path. The way back
is ambiguous (``to_out_0`` could be ``to.out.0`` or ``to_out.0``), so :func:`module_from_kohya` reads
the underscored name against the identifiers diffusers' UNet actually uses; :func:`kohya_lookup` is
the exact alternative when the target model is at hand.
"""

from __future__ import annotations

import re
from typing import Iterable

PEFT_A = "lora_A.weight"
PEFT_B = "lora_B.weight"
DIFFUSERS_UNET_PREFIX = "unet."
KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
KOHYA_DOWN = "lora_down.weight"
KOHYA_UP = "lora_up.weight"
KOHYA_ALPHA = "alpha"

# Attribute names with underscores inside diffusers' UNet2DConditionModel and its blocks. Anything
# not listed is taken to be one word per underscore-separated piece (attn1, norm1, proj, net, ...).
_UNDERSCORED_IDENTIFIERS = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "attentions", "resnets",
    "downsamplers", "upsamplers", "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj",
    "add_v_proj", "to_add_out", "proj_in", "proj_out", "conv_in", "conv_out", "conv_norm_out",
    "conv_shortcut", "time_emb_proj", "time_embedding", "linear_1", "linear_2", "add_embedding",
    "class_embedding", "encoder_hid_proj", "time_proj", "norm_out", "ff_inner",
    # The original (LDM/sgm) layout's, for kohya's SDXL names.
    "input_blocks", "middle_block", "output_blocks", "label_emb", "time_embed", "in_layers", "out_layers",
    "emb_layers", "skip_connection",
)
_IDENTIFIER_PIECES = sorted((name.split("_") for name in _UNDERSCORED_IDENTIFIERS), key=len, reverse=True)

# Module paths of the original (LDM/sgm) UNet layout. kohya writes these for SDXL; they never occur
# in an SD1.5 LoRA trained on diffusers modules.
ORIGINAL_LAYOUT_MARKERS = ("input_blocks_", "middle_block_", "output_blocks_")


def kohya_module_name(module: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`` -> ``lora_unet_down_blocks_0_..._to_out_0``."""
    return KOHYA_UNET_PREFIX + module.replace(".", "_")


def module_from_kohya(name: str) -> str:
    """Inverse of :func:`kohya_module_name` for diffusers UNet module paths.

    Args:
        name: a kohya module name with or without ``lora_unet_``, e.g. ``lora_unet_mid_block_attentions_0_proj_in``.
    Returns:
        The dotted diffusers path, e.g. ``mid_block.attentions.0.proj_in``.
    """
    pieces = name.removeprefix(KOHYA_UNET_PREFIX).split("_")
    parts: list[str] = []
    i = 0
    while i < len(pieces):
        for candidate in _IDENTIFIER_PIECES:
            if pieces[i : i + len(candidate)] == candidate:
                parts.append("_".join(candidate))
                i += len(candidate)
                break
        else:
            parts.append(pieces[i])
            i += 1
    return ".".join(parts)


def kohya_lookup(module_names: Iterable[str]) -> dict[str, str]:
    """Map the underscored form of each module name to the name itself (exact, model-driven inverse)."""
    return {name.replace(".", "_"): name for name in module_names}


def split_peft_key(key: str) -> tuple[str, str] | None:
    """``<module>.lora_A.weight`` -> (``<module>``, ``lora_A.weight``); ``None`` for any other key."""
    match = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight)", key)
    return (match.group(1), match.group(2)) if match else None
