"""Load an original-layout (Stability sgm / webui / ComfyUI) SDXL checkpoint offline.

The component configs are SDXL base 1.0's, shipped under ``spotune/resources/sdxl/`` (a complete
diffusers config folder, so diffusers' own ``StableDiffusionXLPipeline.from_single_file(file,
config=that folder, local_files_only=True)`` reads the same files). Both tokenizers there are CLIP's
BPE vocabulary derived from the shipped merges file (see ``resources/sd15/README.md``); the second
pads with ``"!"`` as OpenCLIP does. The key mapping is :mod:`spotune.export.original_layout_sdxl`, the
one the single-file export writes with.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from spotune.export.original_layout import UNET_PREFIX, VAE_PREFIX, OriginalLayoutError
from spotune.export.original_layout_sdxl import SDXL_TEXT_ENCODER_2_PREFIX, SDXL_TEXT_ENCODER_PREFIX, sdxl_from_original
from spotune.models.single_file import SingleFileError, _build_scheduler, _read_json, read_checkpoint_file

SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_PREFIXES = {
    "unet": UNET_PREFIX,
    "vae": VAE_PREFIX,
    "text_encoder": SDXL_TEXT_ENCODER_PREFIX,
    "text_encoder_2": SDXL_TEXT_ENCODER_2_PREFIX,
}
_WHAT = {
    "unet": "UNet",
    "vae": "VAE",
    "text_encoder": "first text encoder (CLIP ViT-L)",
    "text_encoder_2": "second text encoder (OpenCLIP ViT-bigG)",
}


def sdxl_resources() -> Path:
    """The folder of SDXL base 1.0 component configs shipped with spotune (model_index.json, unet/, ...)."""
    return Path(str(resources.files("spotune") / "resources" / "sdxl"))


def is_sdxl_checkpoint(keys) -> bool:
    """Whether original-layout keys are SDXL's (its conditioner holds the text encoders)."""
    return any(k.startswith("conditioner.embedders.") for k in keys)


def check_sdxl_layout(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a file that is not a complete original-layout SDXL checkpoint, naming what is missing."""
    keys = list(tensors)
    if not is_sdxl_checkpoint(keys):
        raise SingleFileError(f"{path} is not an SDXL checkpoint (no conditioner.embedders.* keys)")
    for component, prefix in _PREFIXES.items():
        if not any(k.startswith(prefix) for k in keys):
            raise SingleFileError(
                f"{path} holds no {_WHAT[component]} ({prefix}* keys); expected a complete SDXL checkpoint "
                "(UNet, VAE and both text encoders)"
            )


def _configs(folder: Path) -> dict[str, dict[str, Any]]:
    configs = {}
    for name in SDXL_COMPONENTS:
        file = folder / name / "config.json"
        if not file.is_file():
            raise SingleFileError(f"{file} is missing: an SDXL config folder holds unet/, vae/, text_encoder/, text_encoder_2/ config.json")
        configs[name] = _read_json(file)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    configs["scheduler"] = _read_json(scheduler if scheduler.is_file() else sdxl_resources() / "scheduler" / "scheduler_config.json")
    index = folder / "model_index.json"
    configs["model_index"] = _read_json(index) if index.is_file() else {}
    return configs


def _empty_models(configs: dict[str, dict[str, Any]]) -> dict[str, torch.nn.Module]:
    """The four models with parameters on the meta device (no memory, no random init)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"])),
        }


def _tokenizer(folder: Path, name: str) -> CLIPTokenizer:
    candidate = folder / name if (folder / name).is_dir() else sdxl_resources() / name
    try:
        return CLIPTokenizer.from_pretrained(str(candidate), local_files_only=True)
    except Exception as exc:
        raise SingleFileError(f"cannot load the CLIP tokenizer in {candidate} ({exc}); expected vocab.json + merges.txt") from exc


def load_sdxl_single_file(
    path: str | Path, dtype: torch.dtype = torch.float32, config_folder: str | Path | None = None
) -> StableDiffusionXLPipeline:
    """Build a :class:`StableDiffusionXLPipeline` from an original-layout SDXL checkpoint, offline.

    Args:
        path: ``.safetensors`` (or ``.ckpt``, read with ``weights_only=True``) with ``model.diffusion_model.*``,
            ``first_stage_model.*``, ``conditioner.embedders.0.transformer.*`` and ``conditioner.embedders.1.model.*``.
        dtype: dtype of every component.
        config_folder: a diffusers-layout config folder for another SDXL-architecture model; SDXL base
            1.0's shipped configs when ``None``.
    Raises:
        SingleFileError: naming the file and the first key that does not fit (a missing text encoder, a
            tensor whose shape differs from the config, keys the configs do not describe).
    """
    path = Path(path)
    if not path.is_file():
        raise SingleFileError(f"checkpoint file {path} does not exist")
    folder = Path(config_folder) if config_folder is not None else sdxl_resources()
    configs = _configs(folder)
    tensors = read_checkpoint_file(path)
    check_sdxl_layout(tensors, path)
    models = _empty_models(configs)
    shapes = {name: {k: v.shape for k, v in model.state_dict().items()} for name, model in models.items()}
    try:
        states, missing, known = sdxl_from_original(tensors, shapes, configs)
    except OriginalLayoutError as exc:
        raise SingleFileError(f"{path}: {exc} (configs in {folder})") from exc
    extra = sorted(k for k in tensors if k.startswith(tuple(_PREFIXES.values())) and k not in known)
    if extra:
        raise SingleFileError(
            f"{path}: key {extra[0]} (and {len(extra) - 1} more) is not part of the SDXL model described by {folder}"
        )
    for name, model in models.items():
        if missing[name]:
            raise SingleFileError(
                f"{path}: {len(missing[name])} {_WHAT[name]} weight(s) missing, e.g. {missing[name][0]} "
                f"(expected by the configs in {folder})"
            )
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in states[name].items()}
        # Buffers the file does not carry (position_ids) keep the values the model was built with.
        model.load_state_dict(state, strict=False, assign=True)
        still_meta = [k for k, v in model.state_dict().items() if v.is_meta]
        if still_meta:
            raise SingleFileError(f"{path}: {_WHAT[name]} weight {still_meta[0]} was not in the file")
    pipe = StableDiffusionXLPipeline(
        vae=models["vae"].eval(),
        text_encoder=models["text_encoder"].eval(),
        text_encoder_2=models["text_encoder_2"].eval(),
        tokenizer=_tokenizer(folder, "tokenizer"),
        tokenizer_2=_tokenizer(folder, "tokenizer_2"),
        unet=models["unet"].eval(),
        scheduler=_build_scheduler(configs["scheduler"]),
        force_zeros_for_empty_prompt=bool(configs["model_index"].get("force_zeros_for_empty_prompt", True)),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

