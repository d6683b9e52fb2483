"""Load an original-layout (CompVis / webui) Stable Diffusion 1.5 checkpoint offline.

A single-file checkpoint carries weights only. The component configs (UNet, VAE, CLIP text encoder,
scheduler) ship with spotune under ``spotune/resources/sd15/`` (SD1.5's published architecture), and
the tokenizer (``sd15/tokenizer/``, or built in memory when a config folder has none) is derived from
CLIP's BPE merges file shipped under ``spotune/resources/clip/``: that
file is OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence, copy beside it), taken verbatim
from the ``clip-anytorch`` 2.6.0 package on PyPI (``clip/bpe_simple_vocab_16e6.txt.gz``, sha256
924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a). Nothing is downloaded.

Weights are renamed with the config-derived key mapping of :mod:`spotune.export.original_layout`,
the same one the single-file export writes with, so export and import are exact inverses.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from spotune.export.original_layout import (
    TEXT_ENCODER_PREFIX,
    TEXT_POSITION_IDS,
    UNET_PREFIX,
    VAE_PREFIX,
    OriginalLayoutError,
    from_original,
    original_key_maps,
)
from spotune.models.errors import ModelLoadError
from spotune.utils.pickles import UnsafePickleError, load_weights_only

CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# What to do with a single file that is not SD1.5-shaped: no command takes other component configs,
# so the way in is a diffusers folder (the Python loader also takes a config_folder argument).
_NOT_SD15_ADVICE = (
    "the file is not SD1.5-architecture: convert it to a diffusers folder (e.g. diffusers' "
    "StableDiffusionPipeline.from_single_file(FILE).save_pretrained(FOLDER)) and pass that folder as the model, "
    "or in Python give load_single_file_pipeline the configs it was made with as its config_folder argument"
)


class SingleFileError(ModelLoadError):
    """A single-file checkpoint that is unreadable, not SD1.5, or does not fit the given configs."""


def sd15_resources() -> Path:
    """The folder of SD1.5 component configs shipped with spotune (model_index.json, unet/, vae/, ...)."""
    return Path(str(resources.files("spotune") / "resources" / "sd15"))


def _clip_bpe_path() -> Path:
    return Path(str(resources.files("spotune") / "resources" / "clip" / CLIP_BPE_FILE))


# -- tokenizer --------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """The 256 stand-in characters of byte-level BPE, in CLIP's order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + n) for n in range(len(rest))]


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's 49408-token vocabulary and its 48894 merges, derived from the BPE merges file.

    CLIP builds its vocabulary as: the 256 byte characters, the same with ``</w>`` (word end), one
    token per merge (the first 48894 merges of the file), then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    path = _clip_bpe_path()
    if not path.is_file():
        raise SingleFileError(
            f"the CLIP tokenizer file {path} is missing from this installation; reinstall spotune (in Python, "
            "load_single_file_pipeline's tokenizer_path argument can name a local copy of the SD1.5 tokenizer folder: "
            "tokenizer/ of stable-diffusion-v1-5/stable-diffusion-v1-5 on the Hugging Face hub)"
        )
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    # Line 0 is a version header; the vocabulary has room for 49408 - 2 * 256 - 2 = 48894 merges.
    merge_count = CLIP_VOCAB_SIZE - 2 * 256 - 2
    merges = [tuple(line.split()) for line in lines[1 : 1 + merge_count]]
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges  # type: ignore[return-value]


def build_sd15_tokenizer() -> CLIPTokenizer:
    """The SD1.5 (CLIP ViT-L/14) tokenizer: 49408 tokens, 77 positions, padded with ``<|endoftext|>``."""
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CLIP_MAX_LENGTH)


def _load_tokenizer(tokenizer_path: Path | None, config_folder: Path, vocab_size: int) -> CLIPTokenizer:
    candidate = tokenizer_path or (config_folder / "tokenizer" if (config_folder / "tokenizer").is_dir() else None)
    if candidate is not None:
        try:
            return CLIPTokenizer.from_pretrained(str(candidate), local_files_only=True)
        except Exception as exc:
            raise SingleFileError(
                f"cannot load a CLIP tokenizer from {candidate} ({exc}); expected a folder with vocab.json + "
                "merges.txt or tokenizer.json"
            ) from exc
    if vocab_size != CLIP_VOCAB_SIZE:
        raise SingleFileError(
            f"the text encoder in {config_folder} has a {vocab_size}-token vocabulary, not CLIP's {CLIP_VOCAB_SIZE}; "
            f"put the tokenizer that belongs to it in {config_folder / 'tokenizer'} (or, in Python, name it with "
            "load_single_file_pipeline's tokenizer_path argument)"
        )
    return build_sd15_tokenizer()


# -- reading the file -------------------------------------------------------------------------------


def read_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` or (read with ``weights_only=True``) ``.ckpt`` checkpoint.

    A ``state_dict`` entry (how Lightning saves the original checkpoints) is unwrapped.
    """
    path = Path(path)
    try:
        if path.suffix in PICKLE_SUFFIXES:
            loaded: Any = load_weights_only(path)
            if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
                loaded = loaded["state_dict"]
            if not isinstance(loaded, dict):
                raise ValueError(f"holds a {type(loaded).__name__}, not a dict of tensors")
            return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        from safetensors.torch import load_file

        return load_file(str(path))
    except UnsafePickleError:
        raise  # already one line naming the file
    except Exception as exc:  # corrupt files raise many types; the user needs the path
        raise SingleFileError(
            f"{path}: cannot read it as a checkpoint ({type(exc).__name__}: {exc}); expected an SD1.5 or SDXL "
            ".safetensors file (or a weights-only .ckpt)"
        ) from exc


def check_sd15_layout(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse files that are not an original-layout SD1.5-family checkpoint, saying what they look like."""
    keys = list(tensors)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders."):
        raise SingleFileError(f"{path} is an SDXL checkpoint (conditioner.embedders.*); spotune's single-file loader reads SD1.5")
    if has("cond_stage_model.model."):
        raise SingleFileError(f"{path} is an SD 2.x checkpoint (OpenCLIP text encoder, cond_stage_model.model.*); expected SD1.5")
    if not has(UNET_PREFIX):
        if has("lora_unet_") or any(".lora_A." in k or ".lora_down." in k for k in keys):
            raise SingleFileError(f"{path} is a LoRA, not a model checkpoint (load it as a LoRA on top of a base model)")
        first = keys[0] if keys else "(no tensors)"
        raise SingleFileError(
            f"{path} is not an original-layout Stable Diffusion checkpoint: no {UNET_PREFIX}* keys (first key: {first})"
        )
    if not has(VAE_PREFIX):
        raise SingleFileError(f"{path} holds no VAE ({VAE_PREFIX}* keys); expected a complete SD1.5 checkpoint")
    if not has("cond_stage_model.transformer."):
        raise SingleFileError(
            f"{path} holds no CLIP text encoder (cond_stage_model.transformer.* keys); expected a complete SD1.5 checkpoint"
        )


def _normalise_text_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old checkpoints (transformers < 4.x) name the text encoder without ``text_model.``; add it."""
    old = "cond_stage_model.transformer."
    out = {}
    for key, value in tensors.items():
        if key.startswith(old) and not key.startswith(TEXT_ENCODER_PREFIX):
            key = TEXT_ENCODER_PREFIX + key.removeprefix(old)
        out[key] = value
    return out


# -- configs and models -----------------------------------------------------------------------------


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SingleFileError(f"{file}: cannot read the component config ({exc})") from exc


def load_component_configs(config_folder: Path) -> dict[str, dict[str, Any]]:
    """``unet``, ``vae``, ``text_encoder`` (and ``scheduler`` if present) configs of a diffusers-layout folder."""
    configs = {}
    for name in ("unet", "vae", "text_encoder"):
        file = config_folder / name / "config.json"
        if not file.is_file():
            raise SingleFileError(
                f"{file} is missing: the config folder must hold unet/, vae/ and text_encoder/ config.json "
                "(a diffusers pipeline folder works)"
            )
        configs[name] = _read_json(file)
    scheduler = config_folder / "scheduler" / "scheduler_config.json"
    configs["scheduler"] = _read_json(scheduler if scheduler.is_file() else sd15_resources() / "scheduler" / "scheduler_config.json")
    return configs


def _empty_models(configs: dict[str, dict[str, Any]]) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """The three models with parameters on the meta device (no memory, no random init); buffers real."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    return unet, vae, text_encoder


def _build_scheduler(config: dict[str, Any]):
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name", "DDIMScheduler")), None) or diffusers.DDIMScheduler
    return cls.from_config(config)


def load_single_file_pipeline(
    path: str | Path,
    config_folder: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionPipeline:
    """Build a :class:`StableDiffusionPipeline` from an original-layout SD1.5 checkpoint, offline.

    Args:
        path: ``.safetensors`` (or ``.ckpt`` etc., read with ``weights_only=True``) holding
            ``model.diffusion_model.*``, ``first_stage_model.*`` and ``cond_stage_model.transformer.*``.
        config_folder: a folder with ``unet/``, ``vae/``, ``text_encoder/`` ``config.json`` (and optionally
            ``scheduler/``, ``tokenizer/``); SD1.5's own configs shipped with spotune when ``None``.
        tokenizer_path: a CLIP tokenizer folder; by default ``config_folder/tokenizer`` if present, else
            the SD1.5 tokenizer derived from the shipped CLIP BPE file.
        dtype: dtype of every component.
    Raises:
        SingleFileError: naming the file and what does not fit (unreadable, SDXL / SD2 / a LoRA, a
            tensor whose shape differs from the config, missing or extra keys).
    """
    path = Path(path)
    if not path.is_file():
        raise SingleFileError(f"checkpoint file {path} does not exist")
    folder = Path(config_folder) if config_folder is not None else sd15_resources()
    configs = load_component_configs(folder)
    tensors = _normalise_text_keys(read_checkpoint_file(path))
    check_sd15_layout(tensors, path)

    unet, vae, text_encoder = _empty_models(configs)
    models = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    shapes = {name: {k: v.shape for k, v in model.state_dict().items()} for name, model in models.items()}
    try:
        maps = original_key_maps(shapes["unet"], configs["unet"], shapes["vae"], configs["vae"], shapes["text_encoder"])
    except OriginalLayoutError as exc:
        raise SingleFileError(f"config folder {folder}: {exc}") from exc

    known = {v for mapping in maps.values() for v in mapping.values()} | {TEXT_ENCODER_PREFIX + TEXT_POSITION_IDS}
    prefixes = (UNET_PREFIX, VAE_PREFIX, TEXT_ENCODER_PREFIX)
    extra = sorted(k for k in tensors if k.startswith(prefixes) and k not in known)
    if extra:
        raise SingleFileError(
            f"{path}: key {extra[0]} (and {len(extra) - 1} more) is not part of the model described by {folder}; "
            f"{_NOT_SD15_ADVICE}"
        )
    for name, model in models.items():
        try:
            state, missing = from_original(tensors, maps[name], shapes[name])
        except OriginalLayoutError as exc:
            raise SingleFileError(f"{path}: {exc}; {_NOT_SD15_ADVICE}") from exc
        if missing:
            raise SingleFileError(
                f"{path}: {len(missing)} {name} weight(s) missing, e.g. {maps[name][missing[0]]} "
                f"(expected by the configs in {folder})"
            )
        # Cast before assigning: the parameters take the tensors as they are (no random init, no copy).
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)

    tokenizer = _load_tokenizer(
        Path(tokenizer_path) if tokenizer_path is not None else None, folder, int(text_encoder.config.vocab_size)
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=_build_scheduler(configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
