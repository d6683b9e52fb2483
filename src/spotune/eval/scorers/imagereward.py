"""ImageReward: BLIP (ViT-L/16 + a BERT with cross-attention) and a linear head, on torch + transformers.

ImageReward's published forward (``ImageReward.score``) is BLIP's multimodal encoder run as in
image-text matching: the ViT encodes the image (all tokens, after the final LayerNorm); the BERT reads
the caption (``[CLS] ... [SEP]``, padded to 35) with bidirectional self-attention and cross-attention
to the image tokens in every layer; the ``[CLS]`` state goes through the five-layer linear head and
is standardised with the published mean and std.

transformers' BLIP classes are ports of the same BLIP code: ``BlipVisionModel`` is BLIP's ViT
(fused ``qkv``, LayerNorm eps 1e-6 set here) and ``BlipTextModel`` called with ``is_decoder=False``
is BLIP's ``BertModel`` in multimodal mode (its cross-attention exists when the config says
``is_decoder``). The weights of ``ImageReward.pt`` are renamed onto them (:func:`convert_imagereward_state_dict`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import BlipTextConfig, BlipVisionConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from spotune.eval.preprocess import CLIP_MEAN, CLIP_STD, resize_shortest_center_crop, to_normalized_tensor
from spotune.eval.scorers.base import (
    Scorer,
    WeightFormatError,
    WeightSpec,
    load_state_dict_file,
    require_path,
    resolve_device,
    resolve_dtype,
)
from spotune.eval.scorers.mlp_head import LinearStackHead

# Constants of ImageReward's published code (ImageReward.__init__): rewards are standardised with them.
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35
IMAGE_SIZE = 224

WEIGHTS = (
    WeightSpec("checkpoint_path", "ImageReward.pt", "the Hugging Face hub repo THUDM/ImageReward"),
    WeightSpec("med_config_path", "med_config.json", "the Hugging Face hub repo THUDM/ImageReward"),
    WeightSpec(
        "tokenizer_path",
        "the bert-base-uncased tokenizer (vocab.txt)",
        "the Hugging Face hub repo google-bert/bert-base-uncased",
        kind="dir",
    ),
)

_VIT_BLOCK_RE = re.compile(r"^blip\.visual_encoder\.blocks\.(\d+)\.(.+)$")
_VIT_BLOCK_RENAMES = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VIT_RENAMES = {
    "blip.visual_encoder.cls_token": "visual_encoder.embeddings.class_embedding",
    "blip.visual_encoder.pos_embed": "visual_encoder.embeddings.position_embedding",
    "blip.visual_encoder.patch_embed.proj.weight": "visual_encoder.embeddings.patch_embedding.weight",
    "blip.visual_encoder.patch_embed.proj.bias": "visual_encoder.embeddings.patch_embedding.bias",
    "blip.visual_encoder.norm.weight": "visual_encoder.post_layernorm.weight",
    "blip.visual_encoder.norm.bias": "visual_encoder.post_layernorm.bias",
}


def convert_imagereward_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ImageReward.pt`` names -> :class:`ImageRewardModel` names.

    ``blip.visual_encoder.*`` (timm-style ViT) maps onto ``BlipVisionModel``; ``blip.text_encoder.*``
    keeps its names (transformers ported them unchanged); ``mlp.layers.*`` is the head. Other BLIP
    parts saved in the file (contrastive projections, ...) are not used by the reward and are skipped.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _VIT_RENAMES:
            out[_VIT_RENAMES[key]] = value
        elif key.startswith("blip.visual_encoder."):
            match = _VIT_BLOCK_RE.match(key)
            rest = match.group(2).rsplit(".", 1) if match else None
            if not match or rest[0] not in _VIT_BLOCK_RENAMES:
                unknown.append(key)
                continue
            out[f"visual_encoder.encoder.layers.{match.group(1)}.{_VIT_BLOCK_RENAMES[rest[0]]}.{rest[1]}"] = value
        elif key.startswith("blip.text_encoder."):
            if key.endswith("position_ids"):
                continue  # a buffer, rebuilt by the model
            out["text_encoder." + key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp.layers."):
            out["head." + key[len("mlp.") :]] = value
    if unknown:
        raise WeightFormatError(f"ImageReward checkpoint: unexpected ViT key(s) {unknown[:4]}")
    return out


def blip_configs(
    state: dict[str, torch.Tensor], med_config: dict, vision_heads: int | None = None
) -> tuple[BlipVisionConfig, BlipTextConfig]:
    """Vision config from the ViT tensors' shapes; text config from ``med_config.json``.

    BLIP's ViT-B and ViT-L both use 64-wide attention heads, so ``vision_heads`` defaults to width / 64.
    """
    pos = state.get("blip.visual_encoder.pos_embed")  # [1, N + 1, W]
    patch = state.get("blip.visual_encoder.patch_embed.proj.weight")  # [W, 3, p, p]
    if pos is None or patch is None:
        raise WeightFormatError("no blip.visual_encoder.pos_embed / patch_embed.proj.weight: not an ImageReward checkpoint")
    width, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    depth = len({int(m.group(1)) for k in state if (m := _VIT_BLOCK_RE.match(k))})
    fc1 = state.get("blip.visual_encoder.blocks.0.mlp.fc1.weight")
    if depth == 0 or fc1 is None:
        raise WeightFormatError("no blip.visual_encoder.blocks.*: not an ImageReward checkpoint")
    heads = vision_heads or width // 64
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(fc1.shape[0]),
        num_hidden_layers=depth,
        num_attention_heads=heads,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
    )
    if not med_config.get("add_cross_attention", False):
        raise WeightFormatError("med_config.json: add_cross_attention must be true (BLIP's multimodal encoder)")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in med_config]
    if missing:
        raise WeightFormatError(f"med_config.json lacks {missing}")
    text = BlipTextConfig(
        vocab_size=int(med_config["vocab_size"]),
        hidden_size=int(med_config["hidden_size"]),
        encoder_hidden_size=width,  # BLIP sets encoder_width = vision_width
        intermediate_size=int(med_config["intermediate_size"]),
        num_hidden_layers=int(med_config["num_hidden_layers"]),
        num_attention_heads=int(med_config["num_attention_heads"]),
        max_position_embeddings=int(med_config.get("max_position_embeddings", 512)),
        hidden_act=str(med_config.get("hidden_act", "gelu")),
        layer_norm_eps=float(med_config.get("layer_norm_eps", 1e-12)),
        pad_token_id=int(med_config.get("pad_token_id", 0)),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_decoder=True,  # creates the cross-attention layers; the forward runs bidirectionally
    )
    return vision, text


class ImageRewardModel(nn.Module):
    """BLIP image encoder + multimodal text encoder + linear head -> standardised reward.

    Args:
        vision_config, text_config: see :func:`blip_configs`.
        head_widths: widths of the five-layer head (input = text hidden size).
    """

    def __init__(self, vision_config: BlipVisionConfig, text_config: BlipTextConfig, head_widths: tuple[int, ...]):
        super().__init__()
        self.visual_encoder = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = LinearStackHead(head_widths)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, 3, 224, 224], [B, 35], [B, 35] -> [B] rewards."""
        image_embeds = self.visual_encoder(pixel_values=pixel_values).last_hidden_state  # [B, 1 + N, Wv]
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        ).last_hidden_state  # [B, 35, Wt]
        rewards = self.head(text[:, 0, :].float())  # [B]
        return (rewards - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def build_imagereward_model(
    state: dict[str, torch.Tensor], med_config: dict, source: str, vision_heads: int | None = None
) -> ImageRewardModel:
    """An :class:`ImageRewardModel` holding the checkpoint's weights; every needed tensor must be present."""
    try:
        vision, text = blip_configs(state, med_config, vision_heads)
        converted = convert_imagereward_state_dict(state)
        head = LinearStackHead.from_state_dict(state, source, prefix="mlp.")
    except WeightFormatError as exc:
        raise WeightFormatError(f"{source}: {exc}") from None
    widths = (head.layers[0].in_features,) + tuple(head.layers[i].out_features for i in (0, 2, 4, 6, 7))
    model = ImageRewardModel(vision, text, widths)
    expected = model.state_dict()
    needed = [k for k in expected if not k.endswith("position_ids")]
    missing = [k for k in needed if k not in converted]
    if missing:
        raise WeightFormatError(f"{source}: {len(missing)} tensor(s) missing, e.g. {missing[:4]}")
    extra = sorted(set(converted) - set(expected))
    if extra:
        raise WeightFormatError(f"{source}: tensor(s) with no place in the model, e.g. {extra[:4]}")
    for key in needed:
        if tuple(converted[key].shape) != tuple(expected[key].shape):
            raise WeightFormatError(
                f"{source}: {key} has shape {tuple(converted[key].shape)}, the model (from med_config.json and the "
                f"ViT tensors) expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=False)
    return model.eval().requires_grad_(False)


def load_blip_tokenizer(folder: Path, vocab_size: int):
    """bert-base-uncased's tokenizer with BLIP's two added tokens ([DEC] as bos, [ENC]), as BLIP builds it."""
    from transformers import BertTokenizer

    if not (folder / "vocab.txt").is_file():
        raise WeightFormatError(f"scorer 'imagereward': {folder} has no vocab.txt (expected the bert-base-uncased tokenizer)")
    tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != vocab_size:
        raise WeightFormatError(
            f"scorer 'imagereward': the tokenizer in {folder} has {len(tokenizer)} tokens with [DEC] and [ENC] added, "
            f"but med_config.json says vocab_size={vocab_size}"
        )
    return tokenizer


class ImageRewardScorer(Scorer):
    """PIL images + captions -> ImageReward (about -2 .. 2; SD1.5 averages about -0.16 in the SPO paper)."""

    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer, batch_size: int = 16, device=None) -> None:
        super().__init__(batch_size, device)
        self.model, self.tokenizer = model, tokenizer
        self.image_size = int(model.visual_encoder.config.image_size)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        crops = [resize_shortest_center_crop(im, self.image_size) for im in images]
        pixel_values = to_normalized_tensor(crops, CLIP_MEAN, CLIP_STD)  # [B, 3, 224, 224]
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH, return_tensors="pt"
        )
        dtype = next(self.model.parameters()).dtype
        return self.model(
            pixel_values.to(self.device, dtype), tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        )


def load_imagereward(
    checkpoint_path: str | Path | None = None,
    med_config_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
    vision_heads: int | None = None,
) -> ImageRewardScorer:
    """ImageReward from ``ImageReward.pt``, ``med_config.json`` and a bert-base-uncased tokenizer folder."""
    ckpt = require_path("imagereward", checkpoint_path, WEIGHTS[0])
    med_file = require_path("imagereward", med_config_path, WEIGHTS[1])
    tok_dir = require_path("imagereward", tokenizer_path, WEIGHTS[2])
    try:
        med_config = json.loads(med_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightFormatError(f"scorer 'imagereward': {med_file} is not valid JSON ({exc})") from None
    if not isinstance(med_config, dict):
        raise WeightFormatError(f"scorer 'imagereward': {med_file} must hold a JSON object")
    state = load_state_dict_file(ckpt, "imagereward")
    model = build_imagereward_model(state, med_config, str(ckpt), vision_heads)
    tokenizer = load_blip_tokenizer(tok_dir, int(med_config["vocab_size"]))
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    model = model.to(device=dev, dtype=dt)
    model.head.float()  # the head runs in float32, as published (``.float()`` before the MLP)
    return ImageRewardScorer(model, tokenizer, batch_size=batch_size, device=dev)
