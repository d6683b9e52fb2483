"""The miniature world's models, in the architecture family of Stable Diffusion 1.5, built in code.

* a word-level CLIP tokenizer (byte-level BPE whose merges spell every word of the world as one token,
  so the text encoder need not compose words from letters), 16 tokens long;
* ``CLIPTextModel``: 2 layers, hidden size 64;
* ``AutoencoderKL``: 32x32 RGB <-> 8x8x4 latents (three blocks of 16, 32, 64 channels);
* ``UNet2DConditionModel``: (64, 128) channels, cross-attention at the 8x8 level and in the middle block;
* DDIM with Stable Diffusion 1.5's noise schedule, optionally with its SNR multiplied by a constant and
  rescaled to zero terminal SNR (:func:`ddim_scheduler`: the schedule of the version-3 candidate);
* a ``CLIPModel`` for judging: ViT with 4x4 patches on 32x32 images, sharing the tokenizer.

Their configurations are fixed here; their weights come from :mod:`spotune.toyworld.pretrain`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from spotune.models.tiny import _byte_level_alphabet, sd15_ddim_scheduler
from spotune.toyworld.world import COLOURS, IMAGE_SIZE, SHAPES
from spotune.utils.io import atomic_write_text

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
    atomic_write_text(folder / "vocab.json", json.dumps(vocab))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    atomic_write_text(folder / "tokenizer_config.json", json.dumps({
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


# SD1.5's 64x64 latent has 4,096 positions, the world's 8x8 latent 64: the shift that gives an attribute
# spread over the whole (or any fixed share of the) world's image the SNR it has in SD1.5's at the same t.
RESOLUTION_SNR_SHIFT = (64 * 64) / (8 * 8)


def shifted_alphas_cumprod(alphas_cumprod: torch.Tensor, snr_shift: float) -> torch.Tensor:
    """A schedule whose SNR is ``snr_shift`` times the given one at every timestep.

    SNR(t) = a_t / (1 - a_t), so the shifted a'_t = s * SNR(t) / (1 + s * SNR(t)).

    Args:
        alphas_cumprod: [T] the cumulative products of the schedule's alphas, in (0, 1).
        snr_shift: s > 0; 1 returns the schedule itself.
    Returns:
        [T] float64 shifted alphas_cumprod, still strictly decreasing.
    """
    snr = snr_shift * alphas_cumprod.double() / (1 - alphas_cumprod.double())
    return snr / (1 + snr)


def zero_terminal_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Rescale a schedule so that its last timestep holds (almost) no signal (Lin et al. 2024, algorithm 1).

    sqrt(a_t) is shifted and scaled linearly so that the first timestep keeps its value and the last one
    becomes 0; the last is then set to 2**-24 instead of 0 (as diffusers' Euler scheduler does), so that
    its SNR, min-SNR weight and x0-prediction stay finite.

    Args:
        alphas_cumprod: [T] strictly decreasing, in (0, 1).
    Returns:
        [T] float64, same first value, last value 2**-24.
    """
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    rescaled = root**2
    rescaled[-1] = 2.0**-24
    return rescaled


def ddim_scheduler(snr_shift: float = 1.0, zero_terminal_snr: bool = False) -> DDIMScheduler:
    """DDIM with Stable Diffusion 1.5's noise schedule, its SNR multiplied by ``snr_shift``.

    Why a shift: noise is drawn independently at every latent position, so an image-level attribute spread
    over k positions is read with about k times one position's SNR. The world's 8x8 latent has 1/64 of
    SD1.5's positions, so at the same t its images keep far less of a scene than SD1.5's do; multiplying
    the SNR by :data:`RESOLUTION_SNR_SHIFT` (64) gives every attribute covering a fixed share of the image
    the SNR it has in SD1.5 at that t (the resolution-dependent shift of Esser et al. 2024, SD3, section
    5.3.2, and of Hoogeboom et al. 2023 for pixel diffusion).

    Why ``zero_terminal_snr``: sampling starts from pure noise, and a shift by 64 alone would leave the
    first sampled step (t = 951) an SNR of 0.53, so the model would be handed pure noise where training
    showed it an image more than half visible. Rescaling to zero terminal SNR (Lin et al. 2024) fixes that
    mismatch; with SD1.5's "leading" timestep spacing the sampler's first step stays at t = 951 (SNR 0.044
    after shift and rescale, against SD1.5's 0.008), so epsilon prediction stays well-posed: only t = 999
    has an SNR near 0, and training sees it while sampling never evaluates it.

    ``snr_shift = 1`` without ``zero_terminal_snr`` (version 2 of the world) is SD1.5's schedule exactly;
    otherwise the betas are stored as ``trained_betas``, so a saved pipeline's scheduler config carries the
    schedule to every consumer (sampler, DDIM log-density, SPM views, GradSPO).
    """
    if not snr_shift > 0:
        raise ValueError(f"snr_shift must be > 0, got {snr_shift}")
    base = sd15_ddim_scheduler()
    if snr_shift == 1.0 and not zero_terminal_snr:
        return base
    alphas = shifted_alphas_cumprod(base.alphas_cumprod, snr_shift)  # [1000]
    if zero_terminal_snr:
        alphas = zero_terminal_alphas_cumprod(alphas)
    previous = torch.cat([torch.ones(1, dtype=alphas.dtype), alphas[:-1]])
    betas = 1 - alphas / previous  # a_t = prod(1 - beta), so beta_t = 1 - a_t / a_{t-1}
    return DDIMScheduler.from_config(base.config, trained_betas=betas.tolist())


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
