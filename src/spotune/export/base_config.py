"""The UNet config of a base model, read without loading its weights (for naming and family checks).

A webui LoRA for SDXL is named by the original UNet layout, whose block numbers follow from the UNet
config; reading the config alone keeps a LoRA-only export of a 7 GB model quick.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spotune.models.family import SDXL
from spotune.models.loading import BUILTIN_TINY_SD15, BUILTIN_TINY_SDXL, single_file_family


def single_file_configs(path: Path) -> Path:
    """The shipped config folder a single-file checkpoint is loaded with: SDXL's for SDXL keys, else SD1.5's."""
    from spotune.models.single_file import sd15_resources
    from spotune.models.single_file_sdxl import sdxl_resources

    return sdxl_resources() if single_file_family(path) is SDXL else sd15_resources()


def base_unet_config(source: str | None) -> dict[str, Any] | None:
    """The UNet config of ``source`` (as given to ``pretrained_model`` / ``--base-model``), or ``None``.

    ``builtin:`` models are built (they are tiny); a diffusers folder gives ``unet/config.json``; a single
    ``.safetensors`` file gives the shipped SD1.5 or SDXL config, by its keys; a hub id its cached config.
    ``None`` when none of these can be read (the caller falls back on what the LoRA itself shows).
    """
    if not source:
        return None
    if source == BUILTIN_TINY_SD15:
        from spotune.models.tiny import build_tiny_unet

        return dict(build_tiny_unet().config)
    if source == BUILTIN_TINY_SDXL:
        from spotune.models.tiny import build_tiny_sdxl_unet

        return dict(build_tiny_sdxl_unet().config)
    path = Path(source).expanduser()
    file: Path | None = None
    if path.is_dir():
        file = path / "unet" / "config.json"
    elif path.is_file():
        file = single_file_configs(path) / "unet" / "config.json"
    elif "/" in source:
        try:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(source, "unet/config.json", local_files_only=True))
        except Exception:  # not cached (offline) or no such file
            return None
    try:
        return json.loads(file.read_text()) if file is not None else None
    except (OSError, json.JSONDecodeError):
        return None
