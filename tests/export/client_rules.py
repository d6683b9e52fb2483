"""What the clients' LoRA loaders do, written out for the tests (no client code runs here).

Each function restates, from the clients' public code, the rule that decides whether a key of a
LoRA file is used and with what strength:

* ComfyUI ``comfy/utils.py`` ``unet_to_diffusers`` (diffusers -> LDM names from a UNet config),
  ``comfy/lora.py`` ``model_lora_keys_unet`` (``lora_unet_<diffusers name, dots as underscores>`` ->
  LDM weight) and ``load_lora`` (``.lora_up.weight``, ``.lora_down.weight``, ``.alpha``; any other
  key is "not loaded"); the patch is ``W + strength * (alpha / rank) * up @ down``, rank = rows of down.
* AUTOMATIC1111 webui ``extensions-builtin/Lora/networks.py``: a key is split at its first dot;
  ``convert_diffusers_name_to_compvis`` turns the module part into an LDM module name that must be
  in the model's ``network_layer_mapping`` (module names with dots as underscores); ``network.py``
  scales by ``alpha / dim`` with dim the rows of lora_down.
* kohya sd-scripts ``networks/lora.py``: ``create_network_from_weights`` reads dim and alpha per
  ``<name>`` (the part before the first dot) and ``LoRANetwork.create_modules`` makes a module for
  every Linear / Conv2d inside a ``Transformer2DModel`` named ``lora_unet_<path>_<child>``.
* diffusers ``load_lora_weights`` of a diffusers-format file: before 0.34 (``get_peft_kwargs``)
  r = the most common rank of the lora_B tensors, lora_alpha = the rank of the *first* one, no alpha
  pattern; from 0.34 the LoraConfig in the ``lora_adapter_metadata`` header.

SDXL (kohya writes its LoRAs with the original sgm UNet's module names):

* ComfyUI: the same ``unet_to_diffusers`` walk with SDXL's detected ``transformer_depth`` (transformer
  layers per input block, e.g. [0, 0, 2, 2, 10, 10]), ``transformer_depth_output`` and
  ``transformer_depth_middle`` (10); ``model_lora_keys_unet`` also maps ``lora_unet_<LDM module, dots as
  underscores>`` for every ``diffusion_model.*.weight`` of the loaded model, which is what an SDXL file uses.
* webui ``networks.py`` ``load_network``: ``convert_diffusers_name_to_compvis`` leaves
  ``lora_unet_input_blocks_...`` as it is, no layer has that name, and the fallback "SDXL loras seem to
  already have correct compvis keys" replaces ``lora_unet`` with ``diffusion_model``: that must be a layer.
* kohya ``LoRANetwork.create_modules`` on ``SdxlUNet2DConditionModel`` (``library/sdxl_original_unet.py``):
  its Transformer2DModel blocks sit at ``input_blocks.{4,5}.1`` (2 layers), ``input_blocks.{7,8}.1``
  (10 layers), ``middle_block.1`` (10) and ``output_blocks.{0,1,2}.1`` (10), ``output_blocks.{3,4,5}.1``
  (2); inside each the Linear layers ``proj_in``, ``proj_out`` (linear projections) and per layer
  ``attn1/attn2.{to_q, to_k, to_v, to_out.0}``, ``ff.net.0.proj``, ``ff.net.2``.
"""

from __future__ import annotations

import collections
import json
import re
from typing import Any, Mapping

import torch

COMFY_ATTENTION_WEIGHTS = ("proj_in.weight", "proj_out.weight")
COMFY_TRANSFORMER_WEIGHTS = tuple(
    f"{attn}.{proj}.weight" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
) + ("ff.net.0.proj.weight", "ff.net.2.weight")


# -- ComfyUI ----------------------------------------------------------------------------------------


def comfy_unet_config(diffusers_config: Mapping[str, Any]) -> dict[str, Any]:
    """The fields ComfyUI's model detection finds in an SD1.5- or SDXL-family LDM state dict.

    ``transformer_depth`` runs over the input blocks' resnets in order (how many transformer layers
    each one's attention has, 0 for none); ``transformer_depth_output`` is collected while walking the
    input blocks forward and the output blocks backward, so it lists the output blocks from the last to
    the first (``unet_to_diffusers`` pops it from the end). ComfyUI counts the layers in the weights;
    here they come from ``transformer_layers_per_block`` (1 for SD1.5), which is what built them.
    """
    layers = diffusers_config["layers_per_block"]
    down = list(diffusers_config["down_block_types"])
    up = list(diffusers_config["up_block_types"])
    layers = [layers] * len(down) if isinstance(layers, int) else list(layers)
    per_level = diffusers_config.get("transformer_layers_per_block") or 1
    per_level = [per_level] * len(down) if isinstance(per_level, int) else list(per_level)
    depth = [per_level[i] if "CrossAttn" in t else 0 for i, t in enumerate(down) for _ in range(layers[i])]
    rev, rev_depth = list(reversed(layers)), list(reversed(per_level))
    output_in_order = [rev_depth[i] if "CrossAttn" in t else 0 for i, t in enumerate(up) for _ in range(rev[i] + 1)]
    return {
        "num_res_blocks": layers,
        "channel_mult": list(range(len(down))),
        "transformer_depth": depth,
        "transformer_depth_output": list(reversed(output_in_order)),
        "transformer_depth_middle": per_level[-1],
    }


def comfy_unet_to_diffusers(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers weight name -> LDM weight name for the attention blocks (ComfyUI's own walk)."""
    num_res_blocks = list(unet_config["num_res_blocks"])
    depth = list(unet_config["transformer_depth"])
    depth_output = list(unet_config["transformer_depth_output"])
    blocks = len(unet_config["channel_mult"])
    out: dict[str, str] = {}

    def attention(diffusers_prefix: str, ldm_prefix: str, count: int) -> None:
        for name in COMFY_ATTENTION_WEIGHTS:
            out[f"{diffusers_prefix}.{name}"] = f"{ldm_prefix}.{name}"
        for t in range(count):
            for name in COMFY_TRANSFORMER_WEIGHTS:
                out[f"{diffusers_prefix}.transformer_blocks.{t}.{name}"] = f"{ldm_prefix}.transformer_blocks.{t}.{name}"

    for x in range(blocks):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            count = depth.pop(0)
            if count > 0:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", count)
            n += 1
    attention("mid_block.attentions.0", "middle_block.1", int(unet_config["transformer_depth_middle"]))
    reversed_blocks = list(reversed(num_res_blocks))
    for x in range(blocks):
        n = (reversed_blocks[x] + 1) * x
        for i in range(reversed_blocks[x] + 1):
            count = depth_output.pop()
            if count > 0:
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", count)
            n += 1
    return out


def comfy_lora_key_map(diffusers_config: Mapping[str, Any]) -> dict[str, str]:
    """ComfyUI's ``model_lora_keys_unet`` for the kohya spelling: LoRA module name -> model weight key."""
    key_map = {}
    for diffusers_key, ldm_key in comfy_unet_to_diffusers(comfy_unet_config(diffusers_config)).items():
        lora_name = "lora_unet_" + diffusers_key.removesuffix(".weight").replace(".", "_")
        key_map[lora_name] = "diffusion_model." + ldm_key
        # LoRAs written with LDM names map too: lora_unet_<LDM name>.
        key_map["lora_unet_" + ldm_key.removesuffix(".weight").replace(".", "_")] = "diffusion_model." + ldm_key
    return key_map


def comfy_load_lora(lora: Mapping[str, torch.Tensor], key_map: Mapping[str, str]) -> tuple[dict, list[str]]:
    """ComfyUI's ``load_lora`` for plain LoRA: (weight key -> (up, down, alpha), keys not loaded)."""
    patches: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]] = {}
    loaded: set[str] = set()
    for name, weight_key in key_map.items():
        up, down, alpha = f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"
        if up in lora:
            value = float(lora[alpha].item()) if alpha in lora else None
            loaded.update({up, down} | ({alpha} if alpha in lora else set()))
            patches[weight_key] = (lora[up], lora[down], value)
    return patches, sorted(k for k in lora if k not in loaded)


def comfy_patch(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, alpha: float | None, strength: float = 1.0) -> torch.Tensor:
    """The patched weight ComfyUI computes (in fp32): scale alpha / rank, 1 when alpha is absent."""
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    product = up.float().flatten(1) @ down.float().flatten(1)
    return weight.float() + strength * scale * product.reshape(weight.shape)


# -- AUTOMATIC1111 webui ----------------------------------------------------------------------------

_WEBUI_RESNET_SUFFIX = {
    "conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection",
}


def webui_compvis_name(key: str) -> str:
    """``convert_diffusers_name_to_compvis`` for UNet names (SD1.5: 3 input blocks per level)."""
    m = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _WEBUI_RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + b * 3 + j}_{1 if kind == 'attentions' else 0}_{rest}"
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        rest = _WEBUI_RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else j * 2}_{rest}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _WEBUI_RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{b * 3 + j}_{1 if kind == 'attentions' else 0}_{rest}"
    return key


def webui_layer_names(ldm_weight_keys: list[str]) -> set[str]:
    """``network_layer_mapping`` keys of an LDM model: module names with dots as underscores."""
    return {k.removesuffix(".weight").replace(".", "_") for k in ldm_weight_keys}


def webui_load(lora: Mapping[str, torch.Tensor], layers: set[str]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """webui's ``load_network``: (layer name -> its tensors by part, keys that matched no layer)."""
    matched: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    failed = []
    for key, weight in lora.items():
        module, _, part = key.partition(".")
        name = webui_compvis_name(module)
        if name not in layers:
            m = re.match(r"(.*)_([qkv]_proj)$", name)
            if not (m and m.group(1) in layers):
                fallback = module.replace("lora_unet", "diffusion_model")
                if fallback not in layers:
                    failed.append(key)
                    continue
                name = fallback
        matched[name][part] = weight
    return dict(matched), failed


def webui_updown(parts: Mapping[str, torch.Tensor], weight_shape: torch.Size, multiplier: float = 1.0) -> torch.Tensor:
    """``network_lora`` for one layer: ``up @ down * multiplier * alpha / dim`` (dim = rows of down)."""
    up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
    dim = down.shape[0]
    scale = float(parts["alpha"].item()) / dim if "alpha" in parts else 1.0
    return (up.flatten(1) @ down.flatten(1)).reshape(weight_shape) * multiplier * scale


# -- kohya sd-scripts -------------------------------------------------------------------------------


def kohya_unet_module_names(unet: torch.nn.Module) -> set[str]:
    """Names ``LoRANetwork.create_modules`` gives the UNet's Linear/Conv2d layers inside Transformer2DModel."""
    names = set()
    for name, module in unet.named_modules():
        if module.__class__.__name__ == "Transformer2DModel":
            for child_name, child in module.named_modules():
                if child.__class__.__name__ in ("Linear", "Conv2d") and child_name:
                    names.add(f"lora_unet.{name}.{child_name}".replace(".", "_"))
    return names


def kohya_dims_and_alphas(lora: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """``create_network_from_weights``: dim (rows of lora_down) and alpha (dim if absent) per module name."""
    dims, alphas = {}, {}
    for key, value in lora.items():
        name = key.split(".")[0]
        if "alpha" in key:
            alphas[name] = float(value.item())
        elif "lora_down" in key:
            dims[name] = int(value.shape[0])
    return dims, {name: alphas.get(name, float(dim)) for name, dim in dims.items()}


def kohya_sdxl_unet_module_names() -> set[str]:
    """Names ``LoRANetwork.create_modules`` gives the Linear layers of kohya's (fixed-size) SDXL UNet."""
    blocks = {f"input_blocks_{n}_1": 2 for n in (4, 5)} | {f"input_blocks_{n}_1": 10 for n in (7, 8)}
    blocks |= {"middle_block_1": 10} | {f"output_blocks_{n}_1": 10 for n in (0, 1, 2)}
    blocks |= {f"output_blocks_{n}_1": 2 for n in (3, 4, 5)}
    names = set()
    for block, count in blocks.items():
        names |= {f"lora_unet_{block}_proj_in", f"lora_unet_{block}_proj_out"}
        for t in range(count):
            layer = f"lora_unet_{block}_transformer_blocks_{t}"
            names |= {f"{layer}_{a}_{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")}
            names |= {f"{layer}_ff_net_0_proj", f"{layer}_ff_net_2"}
    return names


# -- diffusers --------------------------------------------------------------------------------------


def _strip_unet(key: str) -> str:
    return key.removeprefix("unet.")


def diffusers_scales_before_034(tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Module -> the scale diffusers 0.32/0.33 apply to a diffusers-format file (header ignored)."""
    ranks = {_strip_unet(k).removesuffix(".lora_B.weight"): int(v.shape[1]) for k, v in tensors.items() if ".lora_B." in k}
    lora_alpha = next(iter(ranks.values()))  # `r = lora_alpha = list(rank_dict.values())[0]`
    return {module: lora_alpha / rank for module, rank in ranks.items()}


def diffusers_scales_from_034(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, float]:
    """Module -> scale from 0.34 on: the LoraConfig in ``lora_adapter_metadata`` (rank/alpha patterns)."""
    config = {k.removeprefix("unet."): v for k, v in json.loads(metadata["lora_adapter_metadata"]).items()}

    def pattern(module: str, patterns: Mapping[str, Any], default: Any) -> Any:
        # peft's get_pattern_key: a pattern matches a suffix of the module path (diffusers anchors with ^).
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    scales = {}
    for key in tensors:
        if ".lora_B." not in key:
            continue
        module = _strip_unet(key).removesuffix(".lora_B.weight")
        rank = pattern(module, config.get("rank_pattern") or {}, config["r"])
        alpha = pattern(module, config.get("alpha_pattern") or {}, config["lora_alpha"])
        scales[module] = alpha / rank
    return scales


def diffusers_delta(tensors: Mapping[str, torch.Tensor], module: str, scale: float) -> torch.Tensor:
    """``scale * B @ A`` of one module of a diffusers-format file, fp32."""
    a = tensors[f"unet.{module}.lora_A.weight"].float()
    b = tensors[f"unet.{module}.lora_B.weight"].float()
    return scale * (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])
