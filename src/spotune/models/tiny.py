"""Tiny SD1.5-architecture components and a tiny CLIP, built in code with fixed seeds.

They exercise exactly the code paths of real Stable Diffusion 1.5 (``UNet2DConditionModel`` with
cross-attention, ``AutoencoderKL``, ``CLIPTextModel`` + ``CLIPTokenizer``, DDIM) at a size that runs
in seconds on a CPU. ``builtin:tiny-sd15`` and ``builtin:tiny-clip`` in configs resolve to these, and
the test suite uses them in place of downloaded weights.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from spotune.utils.io import atomic_write_text

TINY_IMAGE_SIZE = 32
TINY_TEXT_HIDDEN = 32
TINY_MAX_LENGTH = 77


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE (CLIP's tokenizer) uses for raw bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tiny_clip_tokenizer(folder: str | Path) -> Path:
    """Write a character-level CLIP tokenizer (514 tokens, no merges) to ``folder``.

    Every character is a token, with a ``</w>`` twin for word ends, plus ``<|startoftext|>`` (512)
    and ``<|endoftext|>`` (513). The end-of-text id lies inside the vocabulary and is emitted for
    every caption, so ``CLIPTextModel`` pools the right position (it pools the first eos id).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    alphabet = _byte_level_alphabet()
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    atomic_write_text(folder / "vocab.json", json.dumps(vocab))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n")
    atomic_write_text(folder / "tokenizer_config.json", json.dumps({"model_max_length": TINY_MAX_LENGTH}))
    return folder


@lru_cache(maxsize=1)
def _tokenizer_folder() -> Path:
    return write_tiny_clip_tokenizer(Path(tempfile.mkdtemp(prefix="spotune-tiny-tokenizer-")))


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A character-level :class:`CLIPTokenizer` with 514 tokens and ``model_max_length`` 77."""
    return CLIPTokenizer.from_pretrained(str(_tokenizer_folder()), model_max_length=TINY_MAX_LENGTH)


def tiny_text_config(tokenizer: CLIPTokenizer, hidden_size: int = TINY_TEXT_HIDDEN) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_unet(seed: int = 0, cross_attention_dim: int = TINY_TEXT_HIDDEN) -> UNet2DConditionModel:
    """A two-level cross-attention UNet on 8x8x4 latents (attention module names as in SD1.5)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=TINY_IMAGE_SIZE // 4,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=8,
        )


def build_tiny_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    """A three-level VAE mapping 32x32 RGB to 8x8x4 latents (scale factor 4); ``overrides`` set config values."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=TINY_IMAGE_SIZE,
            **overrides,
        )


def build_tiny_text_encoder(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPTextModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(tiny_text_config(tokenizer))


def sd15_ddim_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion 1.5's noise schedule (scaled-linear betas, offset 1)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_tiny_sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A complete, randomly initialised SD1.5-architecture pipeline (about 1 M parameters)."""
    tokenizer = build_tiny_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=build_tiny_vae(seed),
        text_encoder=build_tiny_text_encoder(tokenizer, seed + 1),
        tokenizer=tokenizer,
        unet=build_tiny_unet(seed + 2),
        scheduler=sd15_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# SDXL: text_encoder (hidden 32) and text_encoder_2 (hidden 32, projection 32) concatenate to 64 channels.
TINY_SDXL_CROSS_ATTENTION = 2 * TINY_TEXT_HIDDEN
TINY_SDXL_POOLED = 32
TINY_SDXL_TIME_EMBED = 8
# The real SDXL VAE's latent scale; the fp16-fix VAE has the same (SD1.5's is 0.18215).
SDXL_VAE_SCALING_FACTOR = 0.13025


def build_tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """A two-level SDXL-architecture UNet on 8x8x4 latents, in the spirit of diffusers' own SDXL tests.

    As in SDXL: ``addition_embed_type="text_time"`` (pooled text embedding + 6 time ids), linear
    projections in the transformers, no attention at the first level, two layers per block and more than
    one transformer layer deeper down, so the original-layout names (``input_blocks_4_1_transformer_blocks_1``)
    come out as kohya writes them for SDXL.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=TINY_IMAGE_SIZE // 4,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=TINY_SDXL_CROSS_ATTENTION,
            addition_embed_type="text_time",
            addition_time_embed_dim=TINY_SDXL_TIME_EMBED,
            projection_class_embeddings_input_dim=TINY_SDXL_POOLED + 6 * TINY_SDXL_TIME_EMBED,
            norm_num_groups=8,
        )


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A complete, randomly initialised SDXL-architecture pipeline: two text encoders (the second with a
    projection, as OpenCLIP bigG), a ``text_time`` UNet, a VAE with SDXL's latent scale, DDIM."""
    tokenizer = build_tiny_tokenizer()
    # SDXL's second tokenizer pads with "!" where the first pads with <|endoftext|>.
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(_tokenizer_folder()), model_max_length=TINY_MAX_LENGTH, pad_token="!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
        torch.manual_seed(seed + 3)
        config_2 = tiny_text_config(tokenizer_2)
        config_2.projection_dim = TINY_SDXL_POOLED
        text_encoder_2 = CLIPTextModelWithProjection(config_2)
    pipe = StableDiffusionXLPipeline(
        vae=build_tiny_vae(seed, scaling_factor=SDXL_VAE_SCALING_FACTOR, force_upcast=True),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=build_tiny_sdxl_unet(seed + 2),
        scheduler=sd15_ddim_scheduler(),  # SDXL base trains with the same scaled-linear schedule, offset 1
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_clip(seed: int = 0, image_size: int = TINY_IMAGE_SIZE) -> tuple[CLIPModel, CLIPTokenizer]:
    """A tiny randomly initialised :class:`CLIPModel` and its tokenizer.

    ``logit_scale`` starts at log(100), the value PickScore and CLIP converge to, so score gaps between
    candidates have the size a real judge produces.
    """
    tokenizer = build_tiny_tokenizer()
    text = tiny_text_config(tokenizer).to_dict()
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, logit_scale_init_value=4.6052)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model.eval(), tokenizer
