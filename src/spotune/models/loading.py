"""Load a Stable Diffusion 1.5 or SDXL pipeline from wherever the user keeps it, with DDIM as the sampler.

Accepted sources, tried in this order:

* ``builtin:tiny-sd15`` / ``builtin:tiny-sdxl``: tiny random SD1.5- / SDXL-architecture components built in
  code (tests, CPU demos);
* a local diffusers folder (has ``model_index.json``);
* a single-file checkpoint (``.safetensors``; ``.ckpt`` read with ``weights_only=True``) in the original
  CompVis/webui layout, converted with component configs shipped inside the package (works offline);
* a Hugging Face hub id (``org/name``): the local hub cache first, the network only when online.

The family (SD1.5 or SDXL) is read from the model itself: a folder's ``model_index.json`` and UNet config,
a single file's keys. ``model_family=`` forces one and refuses a model of the other. ``vae=`` swaps in
another VAE folder (SDXL: the fp16-fix VAE, so the VAE can run in fp16 too).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from spotune.errors import one_line
from spotune.models.errors import ModelLoadError  # raised here and by the single-file loaders
from spotune.models.family import (
    SD15,
    SDXL,
    FamilyError,
    ModelFamily,
    family_named,
    family_of,
    family_of_vae_scale,
    vae_scale_factor,
)
from spotune.utils.pickles import load_weights_only

logger = logging.getLogger(__name__)

BUILTIN_TINY_SD15 = "builtin:tiny-sd15"
BUILTIN_TINY_SDXL = "builtin:tiny-sdxl"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
MODEL_FAMILY_CHOICES = ("auto", "sd15", "sdxl")
# Keys that tell an original-layout checkpoint's family: SDXL's second (OpenCLIP bigG) text encoder,
# SD1.5's one CLIP ViT-L text encoder.
SDXL_SINGLE_FILE_PREFIX = "conditioner.embedders.1.model."
SD15_SINGLE_FILE_PREFIX = "cond_stage_model.transformer."
# The pipeline classes whose model_index.json names an SDXL model.
_SDXL_PIPELINE_CLASSES = frozenset({
    "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
})


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _with_ddim(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Swap in DDIM with the pipeline's own noise schedule (SPO samples and trains with DDIM)."""
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _wanted_family(model_family: str) -> ModelFamily | None:
    if model_family == "auto":
        return None
    return family_named(model_family)


def _check_forced(wanted: ModelFamily | None, found: ModelFamily, what: str) -> None:
    """Refuse a model of the other family than ``model_family=`` asked for, naming both."""
    if wanted is not None and found is not wanted:
        raise FamilyError(
            f"{what} is {found.title} but model_family={wanted.name} asks for {wanted.title}; "
            f"set model_family={found.name} (or auto), or give {wanted.title}"
        )


# -- diffusers folders ------------------------------------------------------------------------------


def _read_json_object(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{file}: not readable JSON ({one_line(exc)})") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file}: expected a JSON object")
    return value


def folder_family(path: Path) -> ModelFamily:
    """The family of a diffusers pipeline folder, from ``model_index.json`` and the UNet's config.

    SDXL when the index names an SDXL pipeline class or a ``text_encoder_2`` component, or when the UNet
    takes the pooled text embedding and time ids (``addition_embed_type: text_time``); else SD1.5.
    """
    index = _read_json_object(path / "model_index.json")
    if index.get("_class_name") in _SDXL_PIPELINE_CLASSES:
        return SDXL
    listed_2 = index.get("text_encoder_2")
    if isinstance(listed_2, (list, tuple)) and any(listed_2):
        return SDXL
    unet_config = path / "unet" / "config.json"
    if unet_config.is_file() and _read_json_object(unet_config).get("addition_embed_type") == "text_time":
        return SDXL
    return SD15


def _check_pipeline_folder(path: Path, family: ModelFamily) -> None:
    """Refuse a folder missing one of the family's component sub-folders, naming the folder and what is missing."""
    missing = [name for name in family.components if not (path / name).is_dir()]
    if missing:
        raise ModelLoadError(
            f"pipeline folder {path} has no {', '.join(f'{m}/' for m in missing)} sub-folder(s), which {family.title} needs; "
            f"a pipeline folder of {family.title} (as written by save_pretrained) holds model_index.json and "
            f"{', '.join(f'{c}/' for c in family.components)}"
        )


def _load_folder(path: Path, wanted: ModelFamily | None, label: str) -> DiffusionPipeline:
    """Load a diffusers folder (local, or a hub snapshot) with its family's pipeline class."""
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"{label} is a folder but not a diffusers pipeline: model_index.json is missing "
            "(expected the layout written by save_pretrained: model_index.json, unet/, vae/, "
            "text_encoder/, tokenizer/, scheduler/, and for SDXL also text_encoder_2/, tokenizer_2/)"
        )
    family = folder_family(path)
    _check_forced(wanted, family, f"{label}")
    _check_pipeline_folder(path, family)
    # SD1.5: no safety checker (spotune scores images, it does not filter them). SDXL: no invisible watermark,
    # which would alter the pixels that are scored.
    extra = {"safety_checker": None, "requires_safety_checker": False} if family is SD15 else {"add_watermarker": False}
    try:
        return family.pipeline_class().from_pretrained(str(path), local_files_only=True, **extra)
    except Exception as exc:  # diffusers raises many types; the user needs the path
        raise ModelLoadError(f"could not load the diffusers pipeline in {label}: {one_line(exc)}") from exc


# -- hub ids ---------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_folder(source: str) -> Path:
    """The local snapshot of hub repo ``source``: the cache when it has it, else a download (only when online).

    Only the pipeline's own components are fetched (no safety checker or feature extractor).
    """
    skip = {"safety_checker": None, "feature_extractor": None, "image_encoder": None}
    try:
        return Path(DiffusionPipeline.download(source, local_files_only=True, **skip))
    except Exception as cached_exc:
        if _hub_offline():
            raise ModelLoadError(
                f"'{source}' is not a local path and not in the local hub cache, and the hub is offline "
                f"(HF_HUB_OFFLINE) ({one_line(cached_exc)}). Pass a local diffusers folder or a single-file "
                ".safetensors checkpoint"
            ) from None
    try:
        return Path(DiffusionPipeline.download(source, **skip))
    except Exception as exc:
        raise ModelLoadError(
            f"'{source}' is not a local path, and downloading it as a hub id failed ({one_line(exc)}). "
            "Offline, pass a local diffusers folder or a single-file .safetensors checkpoint."
        ) from exc


# -- single files ----------------------------------------------------------------------------------


def _single_file_keys(path: Path) -> list[str]:
    """The tensor names of a checkpoint file, without reading its tensors where the format allows."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except Exception:  # the loader reports an unreadable file with its own message
            return []
    try:
        loaded = load_weights_only(path, mmap=True)
    except Exception:  # the loader reports an unreadable (or not weights-only) file with its own message
        return []
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    return list(loaded) if isinstance(loaded, dict) else []


def single_file_family(path: Path) -> ModelFamily | None:
    """SDXL for ``conditioner.embedders.1.model.*`` keys, SD1.5 for ``cond_stage_model.transformer.*``;
    ``None`` when neither (unreadable, a LoRA, SD2.x: the SD1.5 loader names what it is)."""
    keys = _single_file_keys(path)
    if any(k.startswith(SDXL_SINGLE_FILE_PREFIX) for k in keys):
        return SDXL
    if any(k.startswith(SD15_SINGLE_FILE_PREFIX) for k in keys):
        return SD15
    return None


def _load_single_file(path: Path, wanted: ModelFamily | None, dtype: torch.dtype) -> DiffusionPipeline:
    family = single_file_family(path)
    if family is not None:
        _check_forced(wanted, family, f"checkpoint {path}")
    if family is SDXL or (family is None and wanted is SDXL):
        from spotune.models.single_file_sdxl import load_sdxl_single_file

        return load_sdxl_single_file(path, dtype)
    from spotune.models.single_file import load_single_file_pipeline

    return load_single_file_pipeline(path)


# -- the VAE ---------------------------------------------------------------------------------------


def load_vae(source: str | Path):
    """A diffusers ``AutoencoderKL`` from a local VAE folder (``config.json`` + weights), or a pipeline
    folder's ``vae/`` sub-folder.

    Raises:
        ModelLoadError: naming the path and what was expected there.
    """
    from diffusers import AutoencoderKL

    path = Path(os.path.expanduser(str(source)))
    if not path.is_dir():
        raise ModelLoadError(
            f"vae={source}: {'not a folder' if path.exists() else 'does not exist'}; expected a diffusers VAE folder "
            "(config.json + diffusion_pytorch_model.safetensors, e.g. a local copy of madebyollin/sdxl-vae-fp16-fix)"
        )
    subfolder = None
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        subfolder = "vae"  # a whole pipeline folder: take its VAE
    if subfolder is None and not (path / "config.json").is_file():
        raise ModelLoadError(
            f"vae={source}: the folder has no config.json; expected a diffusers VAE folder (config.json + "
            "diffusion_pytorch_model.safetensors) or a pipeline folder with vae/"
        )
    try:
        return AutoencoderKL.from_pretrained(str(path), subfolder=subfolder, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"vae={source}: could not load it as a diffusers AutoencoderKL ({one_line(exc)})") from exc


def _vae_title(scaling_factor: float) -> str:
    family = family_of_vae_scale(scaling_factor)
    kind = "an SD1.5 VAE" if family is SD15 else "an SDXL VAE" if family is SDXL else "a VAE"
    return f"{kind} (scaling_factor {scaling_factor:g})"


def check_vae_fits(vae, pipe, source: str) -> None:
    """Refuse a replacement VAE whose latents are not the model's: another latent scale (an SD1.5 VAE on an
    SDXL model or the reverse) or another number of latent channels.

    Raises:
        FamilyError: naming both VAEs' kinds and scales.
        ModelLoadError: a latent channel count the UNet does not take.
    """
    family = family_of(pipe)
    own = float(pipe.vae.config.scaling_factor)
    given = float(vae.config.scaling_factor)
    if abs(own - given) > 1e-6:
        raise FamilyError(
            f"vae={source} is {_vae_title(given)} but the model is {family.title} whose VAE is {_vae_title(own)}; "
            f"its latents would be mis-scaled. Give a VAE of the model's family (SDXL: madebyollin/sdxl-vae-fp16-fix), "
            "or leave vae= empty"
        )
    channels, wanted = int(vae.config.latent_channels), int(pipe.unet.config.in_channels)
    if channels != wanted:
        raise ModelLoadError(f"vae={source} has {channels} latent channels but the model's UNet takes {wanted}")
    if vae_scale_factor(vae) != vae_scale_factor(pipe.vae):
        raise ModelLoadError(
            f"vae={source} maps {vae_scale_factor(vae)} pixels to one latent, the model's own VAE {vae_scale_factor(pipe.vae)}; "
            "give a VAE of the model's architecture"
        )


def vae_dtype(vae, family: ModelFamily, dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE runs in: ``dtype``, except fp32 for a VAE of a family that honours ``force_upcast``
    whose config sets it (the original SDXL VAE, whose fp16 decode overflows; the fp16-fix VAE does not set it)."""
    if dtype != torch.float32 and family.vae_honours_force_upcast and bool(getattr(vae.config, "force_upcast", False)):
        return torch.float32
    return dtype


# -- the entry point -------------------------------------------------------------------------------


def load_pipeline(
    source: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    *,
    model_family: str = "auto",
    vae: str | None = None,
) -> DiffusionPipeline:
    """Load an SD1.5 (``StableDiffusionPipeline``, no safety checker) or SDXL (``StableDiffusionXLPipeline``)
    pipeline with a DDIM scheduler.

    Args:
        source: ``builtin:tiny-sd15`` / ``builtin:tiny-sdxl``, a diffusers folder, a single-file checkpoint,
            or a hub id.
        dtype: dtype of the UNet and text encoders, and of the VAE except where it must stay fp32 (an SDXL
            VAE whose config sets ``force_upcast``: see :func:`vae_dtype`).
        device: where to put the components; left on CPU when ``None``.
        model_family: ``auto`` (detect), ``sd15`` or ``sdxl`` (refuse a model of the other family).
        vae: a local diffusers VAE folder replacing the model's VAE (SDXL: the fp16-fix VAE); empty or
            ``None`` keeps the model's own.
    Raises:
        ModelLoadError: naming ``source`` and what was expected there.
        FamilyError: a model (or ``vae=``) of the other family than asked for.
    """
    if model_family not in MODEL_FAMILY_CHOICES:
        raise FamilyError(f"model_family must be one of {', '.join(MODEL_FAMILY_CHOICES)}, got {model_family!r}")
    wanted = _wanted_family(model_family)
    if source == BUILTIN_TINY_SD15:
        from spotune.models.tiny import build_tiny_sd15_pipeline

        pipe = build_tiny_sd15_pipeline()
    elif source == BUILTIN_TINY_SDXL:
        from spotune.models.tiny import build_tiny_sdxl_pipeline

        pipe = build_tiny_sdxl_pipeline()
    else:
        path = Path(os.path.expanduser(source))
        if path.is_dir():
            pipe = _load_folder(path, wanted, str(path))
        elif path.is_file():
            if path.suffix not in SINGLE_FILE_SUFFIXES:
                raise ModelLoadError(
                    f"{path}: unknown model file type '{path.suffix}'; expected one of {SINGLE_FILE_SUFFIXES}"
                )
            pipe = _load_single_file(path, wanted, dtype)
        elif _looks_like_hub_id(source) and not path.exists():
            pipe = _load_folder(_hub_folder(source), wanted, f"hub model '{source}'")
        else:
            raise ModelLoadError(
                f"model path {path} does not exist (expected a diffusers folder, a .safetensors "
                f"checkpoint, a hub id, {BUILTIN_TINY_SD15} or {BUILTIN_TINY_SDXL})"
            )
    family = family_of(pipe)
    _check_forced(wanted, family, f"model {source}")
    pipe = _with_ddim(pipe)
    if vae:
        replacement = load_vae(vae)
        check_vae_fits(replacement, pipe, vae)
        pipe.vae = replacement
    for name in ("unet", *family.text_encoder_names):
        module = getattr(pipe, name)
        if module.dtype != dtype:
            module.to(dtype=dtype)
    wanted_vae_dtype = vae_dtype(pipe.vae, family, dtype)
    if pipe.vae.dtype != wanted_vae_dtype:
        pipe.vae.to(dtype=wanted_vae_dtype)
    if wanted_vae_dtype != dtype:
        name = str(dtype).removeprefix("torch.")
        logger.info("%s: the VAE runs in float32 (its config sets force_upcast: it overflows in float16); give the "
                    "fp16-fix VAE as vae= to run it in %s", source, name)
    if device is not None:
        pipe.to(device)
    return pipe
