"""The miniature world's models, in the architecture family of Stable Diffusion 1.5, built in code.

* a word-level CLIP tokenizer (byte-level BPE whose merges spell every word of the world as one token,
  so the text encoder need not compose words from letters), 16 tokens long;
* ``CLIPTextModel``: 2 layers, hidden size 64;
* ``AutoencoderKL``: 32x32 RGB <-> 8x8x4 latents (three blocks of 16, 32, 64 channels);
* ``UNet2DConditionModel``: (64, 128) channels, cross-attention at the 8x8 level and in the middle block;
* DDIM with Stable Diffusion 1.5's noise schedule;
* a ``CLIPModel`` for judging: ViT with 4x4 patches on 32x32 images, sharing the tokenizer.

Their configurations are fixed here; their weights come from :mod:`spotune.toyworld.pretrain`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from spotune.models.tiny import _byte_level_alphabet, sd15_ddim_scheduler
from spotune.toyworld.world import COLOURS, IMAGE_SIZE, SHAPES

MAX_LENGTH = 16
TEXT_HIDDEN = 64
WORDS: tuple[str, ...] = ("a", "an", "on", "background", *SHAPES, *COLOURS)


def _bpe_word(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word as CLIP's tokenizer does it (lowest-rank pair merged first)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return parts


def _word_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Merges that make every word one token: keep adding, at the lowest priority, a merge of the first
    two pieces of any word still in pieces, until every word is whole (earlier merges keep their effect)."""
    merges: list[tuple[str, str]] = []
    while True:
        ranks = {pair: i for i, pair in enumerate(merges)}
        pending = [parts for w in words if len(parts := _bpe_word(w, ranks)) > 1]
        if not pending:
            return merges
        merges.append((pending[0][0], pending[0][1]))


def write_tokenizer(folder: str | Path) -> Path:
    """Write the world's tokenizer (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``) to ``folder``.

    The vocabulary is CLIP's 256 byte symbols, their ``</w>`` twins, the merged pieces and words, then
    ``<|startoftext|>`` and ``<|endoftext|>``; any text still tokenises (letter by letter).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_level_alphabet()
    tokens = alphabet + [ch + "</w>" for ch in alphabet]
    merges = _word_merges(WORDS)
    tokens += [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": MAX_LENGTH,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }))
    return folder


def build_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Write the tokenizer to ``folder`` and load it."""
    return CLIPTokenizer.from_pretrained(str(write_tokenizer(folder)))


def text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    # eos_token_id must be the id the tokenizer emits: CLIPTextModel pools the first position holding it.
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_HIDDEN * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(text_config(tokenizer))


def build_vae() -> AutoencoderKL:
    """32x32 RGB <-> [4, 8, 8] latents. ``scaling_factor`` is set after training (1 / latent std)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def build_unet() -> UNet2DConditionModel:
    """Cross-attention at the 8x8 level and in the 4x4 middle block; module names as in SD1.5."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_clip(tokenizer: CLIPTokenizer) -> CLIPModel:
    """The world's CLIP (the judge's backbone): a 4-layer ViT on 4x4 patches and the 2-layer text tower."""
    vision = dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=4,
    )
    config = CLIPConfig(
        text_config=text_config(tokenizer).to_dict(),
        vision_config=vision,
        projection_dim=64,
        logit_scale_init_value=2.6592,  # log(1/0.07), CLIP's initial temperature
    )
    return CLIPModel(config)


def ddim_scheduler():
    """DDIM with Stable Diffusion 1.5's noise schedule."""
    return sd15_ddim_scheduler()


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
