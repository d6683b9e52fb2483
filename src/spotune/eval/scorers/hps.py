"""HPS v2 / v2.1 (Human Preference Score): an open_clip ViT-H-14 fine-tuned on human choices.

The published checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) hold an open_clip
state dict under ``"state_dict"``; it is converted on load into a transformers ``CLIPModel``
(:mod:`spotune.eval.scorers.open_clip_convert`). Pre-processing is HPS's: longest side to 224
(bicubic), centred on a black square, CLIP normalisation. Score = 100 * cosine(image, text), the
scale of the HPS v2 benchmark tables (the SPO paper reports 23.79 for SD1.5).

Tokenisation uses CLIP's BPE through transformers' ``CLIPTokenizer`` (lower-cased, truncated to 77
with <|endoftext|> kept last), which gives open_clip's ids for ordinary text; text needing ftfy's
mojibake repair may tokenise differently unless ftfy is installed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from spotune.eval.preprocess import CLIP_MEAN, CLIP_STD, resize_longest_pad, to_normalized_tensor
from spotune.eval.scorers.base import (
    Scorer,
    WeightFormatError,
    WeightSpec,
    load_state_dict_file,
    require_path,
    resolve_device,
    resolve_dtype,
)
from spotune.eval.scorers.clip_common import clip_image_embeds, clip_text_embeds, load_clip_tokenizer, tokenize_clip
from spotune.eval.scorers.open_clip_convert import VIT_H_14_HEADS, load_open_clip_as_transformers

CHECKPOINT_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv21": "HPS_v2.1_compressed.pt"}
TOKENIZER_SPEC = WeightSpec(
    "tokenizer_path",
    "CLIP's BPE tokenizer (vocab.json + merges.txt)",
    "the Hugging Face hub repo laion/CLIP-ViT-H-14-laion2B-s32B-b79K (the tokenizer of PickScore's processor)",
    kind="dir",
)


def checkpoint_spec(name: str) -> WeightSpec:
    return WeightSpec("checkpoint_path", CHECKPOINT_FILES[name], "the Hugging Face hub repo xswu/HPSv2")


class HPSScorer(Scorer):
    """100 * cos(image, text) of the converted HPS model."""

    def __init__(self, name: str, model, tokenizer, batch_size: int = 16, device=None) -> None:
        super().__init__(batch_size, device)
        self.name = name
        self.model, self.tokenizer = model, tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.context_length = int(model.config.text_config.max_position_embeddings)

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> [B, 3, 224, 224] as HPS's ``preprocess_val`` makes them."""
        padded = [resize_longest_pad(im, self.image_size, fill=0) for im in images]
        return to_normalized_tensor(padded, CLIP_MEAN, CLIP_STD)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        image = F.normalize(clip_image_embeds(self.model, self.pixel_values(images)).float(), dim=-1)  # [B, E]
        ids = tokenize_clip(self.tokenizer, prompts, self.context_length)  # [B, 77]
        text = F.normalize(clip_text_embeds(self.model, ids).float(), dim=-1)  # [B, E]
        return 100.0 * (image * text).sum(-1)


def load_hps(
    name: str = "hpsv2",
    checkpoint_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
    vision_heads: int = VIT_H_14_HEADS[0],
    text_heads: int = VIT_H_14_HEADS[1],
) -> HPSScorer:
    """HPS v2 (``name="hpsv2"``) or v2.1 (``"hpsv21"``) from the local checkpoint and a CLIP tokenizer folder.

    Args:
        vision_heads, text_heads: attention heads of the open_clip towers (ViT-H-14: 16, 16); only
            tests of tiny synthetic checkpoints change them.
    """
    if name not in CHECKPOINT_FILES:
        raise ValueError(f"unknown HPS version {name!r}; use one of {sorted(CHECKPOINT_FILES)}")
    ckpt = require_path(name, checkpoint_path, checkpoint_spec(name))
    tok_dir = require_path(name, tokenizer_path, TOKENIZER_SPEC)
    state = load_state_dict_file(ckpt, name)
    model = load_open_clip_as_transformers(state, vision_heads, text_heads, source=str(ckpt))
    tokenizer = load_clip_tokenizer(tok_dir, name)
    if tokenizer.eos_token_id != model.config.text_config.eos_token_id:
        raise WeightFormatError(
            f"scorer '{name}': the tokenizer in {tok_dir} ends captions with id {tokenizer.eos_token_id}, but the "
            f"checkpoint's vocabulary ends at {model.config.text_config.eos_token_id}; use CLIP's BPE tokenizer"
        )
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    model = model.to(device=dev, dtype=dt)
    return HPSScorer(name, model, tokenizer, batch_size=batch_size, device=dev)
