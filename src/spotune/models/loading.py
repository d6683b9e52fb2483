"""Load a Stable Diffusion 1.5 pipeline from wherever the user keeps it, with DDIM as the sampler.

Accepted sources, tried in this order:

* ``builtin:tiny-sd15`` / ``builtin:tiny-sdxl``: tiny random SD1.5- / SDXL-architecture components built in
  code (tests, CPU demos);
* a local diffusers folder (has ``model_index.json``);
* a single-file checkpoint (``.safetensors``; ``.ckpt`` read with ``weights_only=True``) in the original
  CompVis/webui layout, converted with component configs shipped inside the package (works offline);
* a Hugging Face hub id (``org/name``), only when online or already in the local hub cache.
"""

from __future__ import annotations

from spotune.errors import SpotuneError, one_line

import json
import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

BUILTIN_TINY_SD15 = "builtin:tiny-sd15"
BUILTIN_TINY_SDXL = "builtin:tiny-sdxl"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


class ModelLoadError(SpotuneError, RuntimeError):
    """A model source that does not exist, is incomplete, or cannot be read."""


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _with_ddim(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """Swap in DDIM with the pipeline's own noise schedule (SPO samples and trains with DDIM)."""
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The components spotune uses; each must be a sub-folder of a diffusers pipeline folder.
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _check_pipeline_folder(path: Path) -> None:
    """Refuse a diffusers folder whose model_index.json is unreadable or whose components are missing."""
    index = path / "model_index.json"
    try:
        listed = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{index}: not readable JSON ({one_line(exc)})") from None
    if not isinstance(listed, dict):
        raise ModelLoadError(f"{index}: expected a JSON object naming the pipeline's components")
    missing = [name for name in REQUIRED_COMPONENTS if not (path / name).is_dir()]
    if missing:
        raise ModelLoadError(
            f"pipeline folder {path} has no {', '.join(f'{m}/' for m in missing)} sub-folder(s); a Stable Diffusion "
            f"pipeline folder (as written by save_pretrained) holds model_index.json and {', '.join(f'{c}/' for c in REQUIRED_COMPONENTS)}"
        )


def load_pipeline(
    source: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> StableDiffusionPipeline:
    """Load an SD1.5-family pipeline (no safety checker) with a DDIM scheduler.

    Args:
        source: ``builtin:tiny-sd15``, a diffusers folder, a single-file checkpoint, or a hub id.
        dtype: dtype for every component (float32 by default, as diffusers does on CPU).
        device: where to put the components; left on CPU when ``None``.
    Raises:
        ModelLoadError: naming ``source`` and what was expected there.
    """
    if source == BUILTIN_TINY_SD15:
        from spotune.models.tiny import build_tiny_sd15_pipeline

        pipe = build_tiny_sd15_pipeline()
    elif source == BUILTIN_TINY_SDXL:
        from spotune.models.tiny import build_tiny_sdxl_pipeline

        pipe = build_tiny_sdxl_pipeline()
    else:
        path = Path(os.path.expanduser(source))
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(
                    f"{path} is a folder but not a diffusers pipeline: model_index.json is missing "
                    "(expected the layout written by save_pretrained: model_index.json, unet/, vae/, "
                    "text_encoder/, tokenizer/, scheduler/)"
                )
            _check_pipeline_folder(path)
            try:
                pipe = StableDiffusionPipeline.from_pretrained(
                    str(path), safety_checker=None, requires_safety_checker=False, local_files_only=True
                )
            except Exception as exc:  # diffusers raises many types; the user needs the path
                raise ModelLoadError(f"could not load the diffusers pipeline in {path}: {one_line(exc)}") from exc
        elif path.is_file():
            if path.suffix not in SINGLE_FILE_SUFFIXES:
                raise ModelLoadError(
                    f"{path}: unknown model file type '{path.suffix}'; expected one of {SINGLE_FILE_SUFFIXES}"
                )
            from spotune.models.single_file import load_single_file_pipeline

            pipe = load_single_file_pipeline(path)
        elif _looks_like_hub_id(source) and not path.exists():
            try:
                pipe = StableDiffusionPipeline.from_pretrained(
                    source, safety_checker=None, requires_safety_checker=False
                )
            except Exception as exc:
                raise ModelLoadError(
                    f"'{source}' is not a local path, and loading it as a hub id failed ({exc}). "
                    "Offline, pass a local diffusers folder or a single-file .safetensors checkpoint."
                ) from exc
        else:
            raise ModelLoadError(
                f"model path {path} does not exist (expected a diffusers folder, a .safetensors "
                f"checkpoint, a hub id, or {BUILTIN_TINY_SD15})"
            )
    pipe = _with_ddim(pipe)
    if pipe.unet.dtype != dtype or pipe.vae.dtype != dtype or pipe.text_encoder.dtype != dtype:
        pipe.to(dtype=dtype)
    if device is not None:
        pipe.to(device)
    return pipe
