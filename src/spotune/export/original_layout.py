"""Key mapping between diffusers' components and the original CompVis/sgm single-file layout (SD1.5's here).

The original checkpoint holds three models under three prefixes:

* ``model.diffusion_model.``  the UNet in LDM naming (``input_blocks.N.M``, ``middle_block.N``,
  ``output_blocks.N.M``, ``time_embed``, ``out``);
* ``first_stage_model.``      the VAE (``encoder.down.I.block.J``, ``decoder.up.I.upsample``, ...);
* ``cond_stage_model.transformer.text_model.``  the CLIP text encoder, in transformers' naming.

The LDM block indices are derived from the UNet/VAE config (number of blocks, layers per block,
which blocks have attention), not from a table of SD1.5's sizes, so any model with SD1.5's kind of
blocks maps both ways: a tiny test model as well as the real one. The mapping is expressed as
module-prefix rules; :func:`to_original` renames a diffusers state dict and :func:`from_original`
inverts the same rules against a model's own key list. SDXL's UNet and VAE use the same rules (its UNet
adds ``label_emb``, the pooled-text/time-id embedding); its two text encoders are in
:mod:`spotune.export.original_layout_sdxl`. :func:`original_module_names` applies the UNet rules to
module names, which is how kohya's SDXL LoRA names are formed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from spotune.errors import SpotuneError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."
TEXT_POSITION_IDS = "embeddings.position_ids"

# ResnetBlock2D: diffusers name -> LDM ResBlock name (UNet) or LDM ResnetBlock name (VAE).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# The VAE's single-head attention: diffusers Linear layers, LDM 1x1 convolutions.
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTENTION_LINEAR = ("q", "k", "v", "proj_out")


class OriginalLayoutError(SpotuneError, ValueError):
    """A state dict whose keys have no place in the original single-file layout (or the reverse)."""


@dataclass(frozen=True)
class _Rule:
    """Module ``diffusers`` is module ``original``; ``inner`` renames the first part(s) of the rest."""

    diffusers: str
    original: str
    inner: Mapping[str, str] = field(default_factory=dict)

    def forward(self, key: str) -> str | None:
        if not key.startswith(self.diffusers + "."):
            return None
        rest = key[len(self.diffusers) + 1 :]
        for src, dst in self.inner.items():
            if rest.startswith(src + "."):
                rest = dst + rest[len(src) :]
                break
        return f"{self.original}.{rest}"


def _per_block(value: int | Iterable[int], count: int) -> list[int]:
    return [int(value)] * count if isinstance(value, int) else [int(v) for v in value]


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


def unet_rules(config: Mapping[str, Any]) -> list[_Rule]:
    """Module-prefix rules for a ``UNet2DConditionModel`` config with SD1.5's or SDXL's kind of blocks.

    LDM numbering: ``input_blocks.0`` is conv_in; each down block adds one input block per layer
    (``.0`` resnet, ``.1`` attention) and, except the last, one for its downsampler (``.0.op``).
    Output blocks run over the up blocks the same way, with ``layers + 1`` entries per block; the
    upsampler sits in the block's last entry after the resnet (``.1``) or the attention (``.2``).
    """
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    layers = _per_block(config["layers_per_block"], len(down_types))
    rules = [
        _Rule("time_embedding.linear_1", "time_embed.0"),
        _Rule("time_embedding.linear_2", "time_embed.2"),
        _Rule("conv_in", "input_blocks.0.0"),
        _Rule("conv_norm_out", "out.0"),
        _Rule("conv_out", "out.2"),
    ]
    if config.get("addition_embed_type") == "text_time":
        # SDXL: the MLP on [pooled text, Fourier time ids] is sgm's label_emb (an nn.Sequential in a Sequential).
        rules += [_Rule("add_embedding.linear_1", "label_emb.0.0"), _Rule("add_embedding.linear_2", "label_emb.0.2")]
    index = 1
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            rules.append(_Rule(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", _UNET_RESNET))
            if _has_attention(block_type):
                rules.append(_Rule(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1"))
            index += 1
        if i < len(down_types) - 1:
            rules.append(_Rule(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{index}.0.op"))
            index += 1
    mid_type = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    rules.append(_Rule("mid_block.resnets.0", "middle_block.0", _UNET_RESNET))
    if _has_attention(mid_type):
        rules.append(_Rule("mid_block.attentions.0", "middle_block.1"))
        rules.append(_Rule("mid_block.resnets.1", "middle_block.2", _UNET_RESNET))
    else:
        rules.append(_Rule("mid_block.resnets.1", "middle_block.1", _UNET_RESNET))
    index = 0
    for i, block_type in enumerate(up_types):
        count = list(reversed(layers))[i] + 1
        for j in range(count):
            rules.append(_Rule(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", _UNET_RESNET))
            if _has_attention(block_type):
                rules.append(_Rule(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1"))
            index += 1
        if i < len(up_types) - 1:
            slot = 2 if _has_attention(block_type) else 1
            rules.append(_Rule(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{index - 1}.{slot}.conv"))
    return rules


def vae_rules(config: Mapping[str, Any]) -> list[_Rule]:
    """Module-prefix rules for an ``AutoencoderKL`` config (LDM numbers decoder levels bottom-up)."""
    levels = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    rules = [_Rule("quant_conv", "quant_conv"), _Rule("post_quant_conv", "post_quant_conv")]
    for side in ("encoder", "decoder"):
        rules += [
            _Rule(f"{side}.conv_in", f"{side}.conv_in"),
            _Rule(f"{side}.conv_out", f"{side}.conv_out"),
            _Rule(f"{side}.conv_norm_out", f"{side}.norm_out"),
            _Rule(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _VAE_RESNET),
            _Rule(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", _VAE_ATTENTION),
            _Rule(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _VAE_RESNET),
        ]
    for i in range(levels):
        for j in range(layers):
            rules.append(_Rule(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))
        if i < levels - 1:
            rules.append(_Rule(f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample"))
        level = levels - 1 - i
        for j in range(layers + 1):
            rules.append(_Rule(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", _VAE_RESNET))
        if i < levels - 1:
            rules.append(_Rule(f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{level}.upsample"))
    return rules


def _key_map(keys: Iterable[str], rules: list[_Rule], prefix: str, what: str, layout: str = "SD1.5") -> dict[str, str]:
    """diffusers key -> original key for every key; a key no rule covers is an error."""
    ordered = sorted(rules, key=lambda r: len(r.diffusers), reverse=True)
    mapping = {}
    for key in keys:
        for rule in ordered:
            renamed = rule.forward(key)
            if renamed is not None:
                mapping[key] = prefix + renamed
                break
        else:
            raise OriginalLayoutError(
                f"{what} key {key} has no place in the original {layout} single-file layout (the model has a part "
                f"that {layout}'s architecture does not)"
            )
    return mapping


def original_module_names(modules: Iterable[str], config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers UNet module name -> original-layout module name, for any module inside a mapped block.

    ``down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q`` -> ``input_blocks.4.1.transformer_blocks.1.attn1.to_q``
    for SDXL's config (level 1, layer 0: 1 + 1 * 3 + 0). A module a rule names exactly (``conv_in``) maps too.

    Raises:
        OriginalLayoutError: a module no rule covers (a part the original layout does not have).
    """
    ordered = sorted(unet_rules(config), key=lambda r: len(r.diffusers), reverse=True)
    out = {}
    for module in modules:
        for rule in ordered:
            if module == rule.diffusers:
                out[module] = rule.original
                break
            # Renamed as its weight is, so that a rule's inner renames (a resnet's conv1) apply to the module too.
            renamed = rule.forward(module + ".weight")
            if renamed is not None:
                out[module] = renamed.removesuffix(".weight")
                break
        else:
            raise OriginalLayoutError(f"UNet module {module} has no place in the original (LDM/sgm) UNet layout")
    return out


def _text_key_map(keys: Iterable[str]) -> dict[str, str]:
    # transformers 5 names the text model's parameters without the "text_model." level, 4.x with it.
    return {key: TEXT_ENCODER_PREFIX + key.removeprefix("text_model.") for key in keys}


def _is_vae_attention_linear(original_key: str) -> bool:
    parts = original_key.split(".")
    return "attn_1" in parts and parts[-2] in _VAE_ATTENTION_LINEAR and parts[-1] == "weight"


def original_key_maps(
    unet_keys: Iterable[str],
    unet_config: Mapping[str, Any],
    vae_keys: Iterable[str],
    vae_config: Mapping[str, Any],
    text_keys: Iterable[str],
) -> dict[str, dict[str, str]]:
    """Per component (``unet``, ``vae``, ``text_encoder``): diffusers key -> original single-file key."""
    return {
        "unet": _key_map(unet_keys, unet_rules(unet_config), UNET_PREFIX, "UNet"),
        "vae": _key_map(vae_keys, vae_rules(vae_config), VAE_PREFIX, "VAE"),
        "text_encoder": _text_key_map(text_keys),
    }


def to_original(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """One original-layout state dict of the three models (floating tensors cast to ``dtype`` if given).

    The VAE attention projections become 1x1 convolution weights [c, c, 1, 1]; the text encoder's
    ``position_ids`` [1, 77] (int64) is included because original checkpoints carry it.
    """
    states = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text_encoder.state_dict()}
    maps = original_key_maps(states["unet"], unet.config, states["vae"], vae.config, states["text_encoder"])
    out: dict[str, torch.Tensor] = {}
    for component, mapping in maps.items():
        for key, new_key in mapping.items():
            tensor = states[component][key].detach().to("cpu")
            if component == "vae" and _is_vae_attention_linear(new_key) and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            out[new_key] = tensor.contiguous()
    positions = int(text_encoder.config.max_position_embeddings)
    out[TEXT_ENCODER_PREFIX + TEXT_POSITION_IDS] = torch.arange(positions, dtype=torch.int64)[None]
    return out


def from_original(
    tensors: Mapping[str, torch.Tensor], mapping: Mapping[str, str], shapes: Mapping[str, torch.Size]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Pick one component's tensors out of an original-layout state dict.

    Args:
        tensors: the whole single-file state dict.
        mapping: diffusers key -> original key for this component (from :func:`original_key_maps`).
        shapes: the shape the model expects for each diffusers key.
    Returns:
        (diffusers state dict, diffusers keys whose original key is absent from ``tensors``).
    Raises:
        OriginalLayoutError: a tensor whose shape does not fit the model, naming both keys.
    """
    state: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for key, original in mapping.items():
        tensor = tensors.get(original)
        if tensor is None:
            missing.append(key)
            continue
        expected = shapes[key]
        if tensor.shape != expected and tensor.numel() == expected.numel() and _is_vae_attention_linear(original):
            tensor = tensor.reshape(expected)  # 1x1 conv [c, c, 1, 1] -> Linear [c, c]
        if tensor.shape != expected:
            raise OriginalLayoutError(
                f"key {original} has shape {tuple(tensor.shape)}, but the model config expects {tuple(expected)} "
                f"(for {key})"
            )
        state[key] = tensor
    return state, missing
