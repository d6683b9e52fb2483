"""SDXL's original (Stability sgm) single-file layout: the UNet, the VAE and both text encoders.

An SDXL base checkpoint holds four models under four prefixes:

* ``model.diffusion_model.``  the UNet, LDM naming as SD1.5's plus ``label_emb`` (the rules of
  :mod:`spotune.export.original_layout`, derived from the UNet config);
* ``first_stage_model.``      the VAE, same layout as SD1.5's;
* ``conditioner.embedders.0.transformer.text_model.``  CLIP ViT-L/14 in transformers' naming;
* ``conditioner.embedders.1.model.``  OpenCLIP ViT-bigG/14 in OpenCLIP's own naming:
  ``token_embedding.weight``, ``positional_embedding`` [77, 1280] (a bare parameter),
  ``transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc,
  mlp.c_proj}``, ``ln_final`` and ``text_projection`` [1280, 1280], which OpenCLIP applies as
  ``x @ text_projection``: the transpose of transformers' ``text_projection.weight``. OpenCLIP's
  attention keeps q, k, v fused in one ``in_proj_weight`` [3 * width, width] (q rows first).

:func:`to_original_sdxl` writes all four; :func:`sdxl_from_original` reads them back for models
built from configs, so export and import are exact inverses.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from spotune.export.original_layout import (
    TEXT_POSITION_IDS,
    UNET_PREFIX,
    VAE_PREFIX,
    OriginalLayoutError,
    _is_vae_attention_linear,
    _key_map,
    from_original,
    unet_rules,
    vae_rules,
)

SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."
# In the original files but not part of the diffusers models (OpenCLIP's contrastive temperature).
SDXL_IGNORED_KEYS = (SDXL_TEXT_ENCODER_2_PREFIX + "logit_scale", SDXL_TEXT_ENCODER_PREFIX + TEXT_POSITION_IDS)
# OpenCLIP clamps its learnt temperature at 100, and ViT-bigG ends there: SDXL base stores ln(100) (4.6055 in
# fp16). No text-to-image client uses it, and diffusers' models do not keep it, so it is written as that
# value: the file then has every key SDXL base has, and loaders that list missing keys list none.
OPEN_CLIP_LOGIT_SCALE = math.log(100.0)

# transformers' CLIP encoder layer -> OpenCLIP's residual attention block (all but the fused q/k/v).
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV = ("q_proj", "k_proj", "v_proj")


def _strip(key: str) -> str:
    """transformers 5 names CLIPTextModel's parameters without ``text_model.``; 4.x and the projection model with it."""
    return key.removeprefix("text_model.")


def clip_l_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL's first text encoder (``CLIPTextModel``) under ``conditioner.embedders.0.transformer.text_model.``."""
    return {SDXL_TEXT_ENCODER_PREFIX + _strip(k): v for k, v in state.items() if not _strip(k).endswith(TEXT_POSITION_IDS)}


def open_clip_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder (``CLIPTextModelWithProjection``) in OpenCLIP's layout.

    Args:
        state: its state dict, ``text_model.*`` [+ ``text_projection.weight`` [P, W]].
    Returns:
        ``conditioner.embedders.1.model.*`` tensors; q/k/v fused into ``in_proj_weight`` [3W, W] and
        ``in_proj_bias`` [3W]; ``text_projection`` [W, P] (transposed).
    Raises:
        OriginalLayoutError: a key OpenCLIP's layout has no place for.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = _strip(key)
        if name.endswith(TEXT_POSITION_IDS):
            continue
        if name == "text_projection.weight":
            out[SDXL_TEXT_ENCODER_2_PREFIX + "text_projection"] = value.t().contiguous()
            continue
        if name in _OPEN_CLIP_TOP:
            out[SDXL_TEXT_ENCODER_2_PREFIX + _OPEN_CLIP_TOP[name]] = value
            continue
        match = _LAYER_KEY.fullmatch(name)
        if match is None:
            raise OriginalLayoutError(f"text_encoder_2 key {key} has no place in OpenCLIP's layout")
        layer, module, kind = int(match[1]), match[2], match[3]
        block = f"{SDXL_TEXT_ENCODER_2_PREFIX}transformer.resblocks.{layer}."
        if module.startswith("self_attn.") and module.removeprefix("self_attn.") in _QKV:
            fused.setdefault((layer, kind), {})[module.removeprefix("self_attn.")] = value
        elif module in _OPEN_CLIP_LAYER:
            out[f"{block}{_OPEN_CLIP_LAYER[module]}.{kind}"] = value
        else:
            raise OriginalLayoutError(f"text_encoder_2 key {key} has no place in OpenCLIP's layout")
    for (layer, kind), parts in fused.items():
        if set(parts) != set(_QKV):
            raise OriginalLayoutError(f"text_encoder_2 layer {layer} lacks one of q/k/v_proj.{kind}")
        out[f"{SDXL_TEXT_ENCODER_2_PREFIX}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts[p] for p in _QKV]
        )
    return out


def _open_clip_source(key: str) -> tuple[str, str | int | None] | None:
    """Where a ``CLIPTextModelWithProjection`` key lives in OpenCLIP's layout: (original key, how to read it),
    ``"t"`` for the transposed projection, 0/1/2 for the q/k/v third of ``in_proj``; ``None`` for position_ids.

    Raises:
        OriginalLayoutError: a key OpenCLIP's layout has no place for.
    """
    name = _strip(key)
    if name.endswith(TEXT_POSITION_IDS):
        return None
    if name == "text_projection.weight":
        return SDXL_TEXT_ENCODER_2_PREFIX + "text_projection", "t"
    if name in _OPEN_CLIP_TOP:
        return SDXL_TEXT_ENCODER_2_PREFIX + _OPEN_CLIP_TOP[name], None
    match = _LAYER_KEY.fullmatch(name)
    if match is not None:
        layer, module, kind = int(match[1]), match[2], match[3]
        block = f"{SDXL_TEXT_ENCODER_2_PREFIX}transformer.resblocks.{layer}."
        projection = module.removeprefix("self_attn.")
        if module.startswith("self_attn.") and projection in _QKV:
            return f"{block}attn.in_proj_{kind}", _QKV.index(projection)
        if module in _OPEN_CLIP_LAYER:
            return f"{block}{_OPEN_CLIP_LAYER[module]}.{kind}", None
    raise OriginalLayoutError(f"text_encoder_2 key {key} has no place in OpenCLIP's layout")


def open_clip_from_original(
    tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The inverse of :func:`open_clip_to_original` for a model whose state dict has ``shapes``.

    Returns:
        (the model's state dict, the original keys of its weights that ``tensors`` lacks).
    Raises:
        OriginalLayoutError: a tensor whose shape does not fit, naming the original key.
    """
    state: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for key, expected in shapes.items():
        source = _open_clip_source(key)
        if source is None:
            continue
        original, transform = source
        tensor = tensors.get(original)
        if tensor is None:
            missing.append(original)
            continue
        if transform == "t":
            tensor = tensor.t()
        elif isinstance(transform, int):
            if tensor.shape[0] % 3:
                raise OriginalLayoutError(f"key {original} has shape {tuple(tensor.shape)}: not three fused q/k/v blocks")
            tensor = tensor.chunk(3)[transform]
        if tensor.shape != expected:
            raise OriginalLayoutError(
                f"key {original} has shape {tuple(tensor.shape)}, but the model config expects {tuple(expected)} (for {key})"
            )
        state[key] = tensor.contiguous()
    return state, missing


def open_clip_original_keys(shapes: Mapping[str, torch.Size]) -> set[str]:
    """The original keys a second text encoder of these ``shapes`` reads (for the unknown-key check)."""
    return {source[0] for source in map(_open_clip_source, shapes) if source is not None}


def unet_vae_key_maps(
    unet_keys, unet_config: Mapping, vae_keys, vae_config: Mapping
) -> dict[str, dict[str, str]]:
    """diffusers key -> original key for SDXL's UNet and VAE (``unet``, ``vae``)."""
    return {
        "unet": _key_map(unet_keys, unet_rules(unet_config), UNET_PREFIX, "UNet", "SDXL"),
        "vae": _key_map(vae_keys, vae_rules(vae_config), VAE_PREFIX, "VAE", "SDXL"),
    }


def to_original_sdxl(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    text_encoder_2: torch.nn.Module,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """One sgm-layout state dict of SDXL's four models (floating tensors cast to ``dtype`` if given).

    The first text encoder's ``position_ids`` [1, 77] (int64) and OpenCLIP's ``logit_scale`` (0-dim,
    :data:`OPEN_CLIP_LOGIT_SCALE`) are written as SDXL base carries them; the VAE attention projections
    become 1x1 convolutions [c, c, 1, 1] as in SD1.5's layout.
    """
    unet_state, vae_state = unet.state_dict(), vae.state_dict()
    maps = unet_vae_key_maps(unet_state, unet.config, vae_state, vae.config)
    out: dict[str, torch.Tensor] = {}
    for component, state in (("unet", unet_state), ("vae", vae_state)):
        for key, new_key in maps[component].items():
            tensor = state[key].detach().to("cpu")
            if component == "vae" and _is_vae_attention_linear(new_key) and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
            out[new_key] = tensor
    out.update({k: v.detach().to("cpu") for k, v in clip_l_to_original(text_encoder.state_dict()).items()})
    out.update({k: v.detach().to("cpu") for k, v in open_clip_to_original(text_encoder_2.state_dict()).items()})
    out[SDXL_TEXT_ENCODER_2_PREFIX + "logit_scale"] = torch.tensor(OPEN_CLIP_LOGIT_SCALE, dtype=torch.float32)
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    positions = int(text_encoder.config.max_position_embeddings)
    out[SDXL_TEXT_ENCODER_PREFIX + TEXT_POSITION_IDS] = torch.arange(positions, dtype=torch.int64)[None]
    return {k: v.contiguous() for k, v in out.items()}


def sdxl_from_original(
    tensors: Mapping[str, torch.Tensor],
    shapes: Mapping[str, Mapping[str, torch.Size]],
    configs: Mapping[str, Mapping],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, list[str]], set[str]]:
    """Split an sgm-layout SDXL state dict into the four models' state dicts.

    Args:
        tensors: the whole single-file state dict.
        shapes: per component (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``) the model's key shapes.
        configs: ``unet`` and ``vae`` configs (the block structure the UNet/VAE rules derive from).
    Returns:
        (state dicts, original keys missing per component, every original key the models read).
    """
    maps = unet_vae_key_maps(shapes["unet"], configs["unet"], shapes["vae"], configs["vae"])
    states: dict[str, dict[str, torch.Tensor]] = {}
    missing: dict[str, list[str]] = {}
    for component in ("unet", "vae"):
        states[component], absent = from_original(tensors, maps[component], shapes[component])
        missing[component] = [maps[component][k] for k in absent]
    te_map = {k: SDXL_TEXT_ENCODER_PREFIX + _strip(k) for k in shapes["text_encoder"] if not _strip(k).endswith(TEXT_POSITION_IDS)}
    states["text_encoder"], absent = from_original(tensors, te_map, shapes["text_encoder"])
    missing["text_encoder"] = [te_map[k] for k in absent]
    states["text_encoder_2"], missing["text_encoder_2"] = open_clip_from_original(tensors, shapes["text_encoder_2"])
    known = {v for component in ("unet", "vae") for v in maps[component].values()} | set(te_map.values())
    known |= open_clip_original_keys(shapes["text_encoder_2"]) | set(SDXL_IGNORED_KEYS)
    return states, missing, known
