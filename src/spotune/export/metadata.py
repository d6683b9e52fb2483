"""What exported files say about themselves: the base model's name, the trained resolution, kohya's hashes.

Files users publish must not carry the paths of the machine they were made on, so the base model is
named by :func:`model_name` (a hub id as given, otherwise the file's or folder's base name). The
resolution is the one training used: the run's ``resolution`` setting, or when that was unset the
model's own default, which is what the recipe samples at (the VAE's ``sample_size``).

:func:`kohya_hashes` computes ``sshs_model_hash`` and ``sshs_legacy_hash`` exactly as kohya
sd-scripts' ``train_util.precalculate_safetensors_hashes`` does; AUTOMATIC1111 webui reads
``sshs_model_hash`` to identify a LoRA (and computes the same value itself when it is absent).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch

# The Stability ModelSpec version kohya sd-scripts writes (library/sai_model_spec.py, BASE_METADATA).
SAI_MODEL_SPEC_VERSION = "1.0.1"
# SD1.5's own image size: what a model of that family samples at when nothing else is known.
SD15_DEFAULT_RESOLUTION = 512
# The part of a safetensors file that kohya's legacy hash reads (as sd-webui-additional-networks did).
_LEGACY_HASH_OFFSET = 0x100000
_LEGACY_HASH_LENGTH = 0x10000
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def model_name(source: str | os.PathLike[str] | None) -> str:
    """The name to write for a model source: never a local path.

    Args:
        source: what the run was given as ``pretrained_model`` (a folder, a file, a hub id,
            ``builtin:...``) or ``None``.
    Returns:
        ``builtin:...`` and hub ids (``org/name``, not present on disk) unchanged; for anything else the
        base name of the file or folder (``/models/sd15/`` -> ``sd15``, ``C:\\m\\v1-5.safetensors`` ->
        ``v1-5.safetensors``); ``""`` for ``None``.
    """
    if source is None:
        return ""
    text = str(source).strip()
    if text.startswith("builtin:"):
        return text
    if _HUB_ID.fullmatch(text) and not Path(text).expanduser().exists():
        return text
    # Split on both separators: a run made on Windows may be exported on Linux and the reverse.
    parts = [p for p in re.split(r"[\\/]+", text) if p not in ("", ".", "..", "~")]
    return parts[-1] if parts else ""


def _vae_sample_size(config_file: Path) -> int | None:
    try:
        value = json.loads(config_file.read_text()).get("sample_size")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def model_default_resolution(source: str | None) -> int:
    """The image size the recipe uses for ``source`` when ``resolution`` is unset (its VAE's ``sample_size``).

    Read from the model's own ``vae/config.json`` for a diffusers folder, from spotune's shipped SD1.5
    or SDXL configs for a single file (those are the configs it is loaded with; SDXL's when the file
    holds SDXL's keys), from the built-in model, or from the local hub cache for a hub id. When none of
    these can be read (a hub model that is not cached, a bare LoRA file with no run), SD1.5's 512.
    """
    if not source:
        return SD15_DEFAULT_RESOLUTION
    if source.startswith("builtin:"):
        from spotune.models.loading import BUILTIN_TINY_SD15, BUILTIN_TINY_SDXL
        from spotune.models.tiny import TINY_IMAGE_SIZE

        return TINY_IMAGE_SIZE if source in (BUILTIN_TINY_SD15, BUILTIN_TINY_SDXL) else SD15_DEFAULT_RESOLUTION
    path = Path(source).expanduser()
    size: int | None = None
    if path.is_dir():
        size = _vae_sample_size(path / "vae" / "config.json")
    elif path.is_file():
        from spotune.export.base_config import single_file_configs

        size = _vae_sample_size(single_file_configs(path) / "vae" / "config.json")
    elif _HUB_ID.fullmatch(source):
        try:
            from huggingface_hub import hf_hub_download

            size = _vae_sample_size(Path(hf_hub_download(source, "vae/config.json", local_files_only=True)))
        except Exception:  # not cached (offline) or no such file: the family default below
            size = None
    return size or SD15_DEFAULT_RESOLUTION


def now_iso() -> str:
    """Local time to the second, ISO 8601, as kohya writes ``modelspec.date``."""
    return datetime.datetime.now().replace(microsecond=0).isoformat()


def _payload_offset(serialized: bytes) -> int:
    """Where the tensor bytes start: after the 8-byte header length and the JSON header."""
    return 8 + int.from_bytes(serialized[:8], "little")


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` of a LoRA file, computed as kohya sd-scripts computes them.

    kohya serialises the tensors with only the ``ss_*`` training metadata (user-editable ``modelspec.*``
    and ``sshs_*`` left out, so editing those does not change the hashes), then:

    * model hash: SHA-256 (hex) of everything after the header, i.e. of the tensor bytes. Those do
      not depend on the metadata, so this equals what webui computes from the written file;
    * legacy hash: the first 8 hex digits of SHA-256 of the 64 KiB at offset 1 MiB of that
      serialisation (of nothing, for files smaller than 1 MiB, as in kohya).

    Args:
        tensors: the state dict exactly as it will be written (names, dtypes, values).
        metadata: the file's metadata; only its ``ss_*`` entries enter the hash.
    """
    from safetensors.torch import save

    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    serialized = save({k: v.contiguous() for k, v in tensors.items()}, training)
    model_hash = hashlib.sha256(serialized[_payload_offset(serialized):]).hexdigest()
    window = serialized[_LEGACY_HASH_OFFSET : _LEGACY_HASH_OFFSET + _LEGACY_HASH_LENGTH]
    legacy_hash = hashlib.sha256(window).hexdigest()[:8]
    return model_hash, legacy_hash


def single_file_metadata(
    title: str, description: str, resolution: int, base_model: str | None, architecture: str = "stable-diffusion-v1"
) -> dict[str, str]:
    """Stability ModelSpec metadata of a whole checkpoint, as kohya writes it for one (strings only).

    ``architecture``: the family's ``modelspec_checkpoint_architecture`` (``stable-diffusion-xl-v1-base`` for SDXL).
    """
    return {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.description": description,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": now_iso(),
        "modelspec.merged_from": model_name(base_model),
    }
