"""Convert an open_clip CLIP state dict (e.g. HPS v2's ViT-H-14) into a transformers ``CLIPModel``.

open_clip and transformers compute the same network with different parameter layouts:

==========================================  ===============================================================
open_clip                                   transformers ``CLIPModel``
==========================================  ===============================================================
``token_embedding.weight``                  ``text_model.embeddings.token_embedding.weight``
``positional_embedding`` [L, D]             ``text_model.embeddings.position_embedding.weight``
``transformer.resblocks.i.ln_1``            ``text_model.encoder.layers.i.layer_norm1``
``...attn.in_proj_weight`` [3D, D]          ``...self_attn.{q,k,v}_proj.weight`` (split in three, same for bias)
``...attn.out_proj``                        ``...self_attn.out_proj``
``...ln_2`` / ``mlp.c_fc`` / ``mlp.c_proj``  ``...layer_norm2`` / ``mlp.fc1`` / ``mlp.fc2``
``ln_final``                                ``text_model.final_layer_norm``
``text_projection`` [D, E] (x @ P)          ``text_projection.weight`` [E, D] (transposed)
``visual.conv1.weight``                     ``vision_model.embeddings.patch_embedding.weight``
``visual.class_embedding`` [W]              ``vision_model.embeddings.class_embedding``
``visual.positional_embedding`` [N+1, W]    ``vision_model.embeddings.position_embedding.weight``
``visual.ln_pre`` / ``visual.ln_post``      ``vision_model.pre_layrnorm`` / ``vision_model.post_layernorm``
``visual.transformer.resblocks.i...``       ``vision_model.encoder.layers.i...`` (as for text)
``visual.proj`` [W, E]                      ``visual_projection.weight`` [E, W] (transposed)
``logit_scale``                             ``logit_scale``
==========================================  ===============================================================

Sizes are read from the tensors; the head counts cannot be, so they are arguments (ViT-H-14:
16 and 16). Text pooling matches open_clip's ``argmax`` over token ids because the end-of-text id is
set to the largest id, which CLIP's tokenizer gives only to ``<|endoftext|>``. Activation: plain GELU
(open_clip's ViT-H-14 does not use QuickGELU).
"""

from __future__ import annotations

import re

import torch
from transformers import CLIPConfig, CLIPModel

from spotune.eval.scorers.base import WeightFormatError

VIT_H_14_HEADS = (16, 16)  # (vision heads, text heads) of open_clip's ViT-H-14

_BLOCK_RE = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_RENAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_PLAIN_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
# Buffers some open_clip versions save; they carry no weights.
_IGNORED = {"attn_mask", "visual.attn_mask"}


def _num_blocks(state: dict[str, torch.Tensor], visual: bool) -> int:
    prefix = "visual.transformer.resblocks." if visual else "transformer.resblocks."
    ids = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    if not ids:
        raise WeightFormatError(f"no {prefix}* keys: this is not an open_clip CLIP state dict")
    if ids != set(range(len(ids))):
        raise WeightFormatError(f"{prefix}* block numbers are not contiguous: {sorted(ids)}")
    return len(ids)


def _need(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise WeightFormatError(f"open_clip state dict has no '{key}'")
    return state[key]


def clip_config_from_open_clip(
    state: dict[str, torch.Tensor], vision_heads: int, text_heads: int, layer_norm_eps: float = 1e-5
) -> CLIPConfig:
    """A :class:`CLIPConfig` with every size read from the open_clip tensors."""
    conv = _need(state, "visual.conv1.weight")  # [W, 3, p, p]
    vis_pos = _need(state, "visual.positional_embedding")  # [N + 1, W]
    vision_width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = int(round((vis_pos.shape[0] - 1) ** 0.5))
    if grid * grid != vis_pos.shape[0] - 1:
        raise WeightFormatError(f"visual.positional_embedding has {vis_pos.shape[0]} rows, expected 1 + a square")
    tok = _need(state, "token_embedding.weight")  # [V, D]
    text_pos = _need(state, "positional_embedding")  # [L, D]
    vocab, text_width = int(tok.shape[0]), int(tok.shape[1])
    embed_dim = int(_need(state, "text_projection").shape[1])
    for name, width, heads in (("vision", vision_width, vision_heads), ("text", text_width, text_heads)):
        if width % heads:
            raise WeightFormatError(f"{name} width {width} is not divisible by {heads} heads")
    text_config = dict(
        vocab_size=vocab,
        hidden_size=text_width,
        intermediate_size=int(_need(state, "transformer.resblocks.0.mlp.c_fc.weight").shape[0]),
        num_hidden_layers=_num_blocks(state, visual=False),
        num_attention_heads=text_heads,
        max_position_embeddings=int(text_pos.shape[0]),
        hidden_act="gelu",
        layer_norm_eps=layer_norm_eps,
        projection_dim=embed_dim,
        # open_clip pools at argmax(token ids): CLIP's tokenizer gives the largest id to <|endoftext|>.
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=0,
    )
    vision_config = dict(
        hidden_size=vision_width,
        intermediate_size=int(_need(state, "visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0]),
        num_hidden_layers=_num_blocks(state, visual=True),
        num_attention_heads=vision_heads,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=layer_norm_eps,
        projection_dim=embed_dim,
    )
    logit_scale = float(state["logit_scale"]) if "logit_scale" in state else 4.6052
    return CLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=embed_dim, logit_scale_init_value=logit_scale
    )


def convert_open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename, split and transpose open_clip tensors into transformers ``CLIPModel`` names.

    Raises:
        WeightFormatError: on a key that has no place in the transformers model.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _IGNORED:
            continue
        if key in _PLAIN_RENAMES:
            out[_PLAIN_RENAMES[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        match = _BLOCK_RE.match(key)
        if not match:
            unknown.append(key)
            continue
        tower = "vision_model" if match.group(1) else "text_model"
        prefix = f"{tower}.encoder.layers.{match.group(2)}."
        rest = match.group(3)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if rest.endswith("weight") else "bias"
            q, k, v = value.chunk(3, dim=0)  # rows [0:D] = q, [D:2D] = k, [2D:3D] = v
            out[prefix + f"self_attn.q_proj.{kind}"] = q.contiguous()
            out[prefix + f"self_attn.k_proj.{kind}"] = k.contiguous()
            out[prefix + f"self_attn.v_proj.{kind}"] = v.contiguous()
        elif rest in _BLOCK_RENAMES:
            out[prefix + _BLOCK_RENAMES[rest]] = value
        else:
            unknown.append(key)
    if unknown:
        raise WeightFormatError(
            f"open_clip state dict has {len(unknown)} key(s) with no counterpart in a plain CLIP ViT "
            f"(e.g. {unknown[:4]}); only standard open_clip ViT text+vision towers are supported"
        )
    return out


def load_open_clip_as_transformers(
    state: dict[str, torch.Tensor],
    vision_heads: int = VIT_H_14_HEADS[0],
    text_heads: int = VIT_H_14_HEADS[1],
    source: str = "open_clip state dict",
) -> CLIPModel:
    """A float32 transformers :class:`CLIPModel` computing the same function as the open_clip weights.

    Args:
        state: the open_clip model's state dict (``visual.*``, ``transformer.*``, ...).
        vision_heads, text_heads: attention heads per tower (not recoverable from the shapes).
        source: names the file in errors.
    """
    try:
        config = clip_config_from_open_clip(state, vision_heads, text_heads)
        converted = convert_open_clip_state_dict(state)
    except WeightFormatError as exc:
        raise WeightFormatError(f"{source}: {exc}") from None
    model = CLIPModel(config)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in converted and not k.endswith("position_ids"))
    if missing:
        raise WeightFormatError(f"{source}: the converted weights lack {len(missing)} tensor(s), e.g. {missing[:4]}")
    for key, value in converted.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise WeightFormatError(
                f"{source}: {key} has shape {tuple(value.shape)} after conversion, the model expects "
                f"{tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=False)
    return model.eval().requires_grad_(False)
