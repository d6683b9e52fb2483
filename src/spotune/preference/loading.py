"""Reading a judge's files: a local CLIPModel folder, its tokenizer, and its image pre-processing.

PickScore_v1 ships only the model (``config.json`` + weights); its tokenizer and
``preprocessor_config.json`` live in the processor folder it was trained with
(laion/CLIP-ViT-H-14-laion2B-s32B-b79K). So the tokenizer and pre-processing are read from
``processor_path`` when given, else from the CLIP folder itself, and the pre-processing falls back to
the CLIP defaults (the vision tower's image size, OpenAI's mean/std) when no JSON is found.
``preprocessor_config.json`` is parsed directly: ``CLIPImageProcessor`` may need torchvision.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from spotune.errors import SpotuneError
from spotune.hints import key
from spotune.utils.clip_pixels import CLIP_MEAN, CLIP_STD

BUILTIN_TINY_CLIP = "builtin:tiny-clip"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


class JudgeLoadError(SpotuneError, ValueError):
    """A judge's model folder, processor folder or checkpoint that is missing, unreadable or mismatched."""


@dataclass(frozen=True)
class ImageProcessing:
    """How a CLIP judge turns images into pixel values: resize + centre-crop to ``size``, then normalise."""

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


def _size_value(value, key: str, file: Path) -> int:
    """``224``, ``{"shortest_edge": 224}`` or ``{"height": 224, "width": 224}`` -> 224."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and "width" in value:
            if value["height"] != value["width"]:
                raise JudgeLoadError(f"{file}: '{key}' must be square, got {value}")
            return int(value["height"])
    raise JudgeLoadError(f"{file}: cannot read '{key}' = {value!r} (expected an int or {{'shortest_edge': N}})")


def read_image_processing(folder: str | Path, default_size: int) -> ImageProcessing:
    """Parse ``folder/preprocessor_config.json`` (CLIP image processor format) if it exists.

    Args:
        folder: a processor or model folder.
        default_size: the size used when the folder has no ``preprocessor_config.json``.
    Raises:
        JudgeLoadError: the JSON exists but is invalid, or resizes and crops to different sizes
            (the tensor pre-processing here resizes the shortest side and crops to one size).
    """
    file = Path(folder) / "preprocessor_config.json"
    if not file.is_file():
        return ImageProcessing(size=default_size)
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise JudgeLoadError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise JudgeLoadError(f"{file}: expected a JSON object")
    size = _size_value(data["size"], "size", file) if "size" in data else default_size
    if "crop_size" in data:
        crop = _size_value(data["crop_size"], "crop_size", file)
        if crop != size:
            raise JudgeLoadError(
                f"{file}: size {size} and crop_size {crop} differ; spotune resizes the shortest side and "
                "centre-crops to one size (CLIP processors use the same value for both)"
            )
    mean = tuple(float(v) for v in data.get("image_mean", CLIP_MEAN))
    std = tuple(float(v) for v in data.get("image_std", CLIP_STD))
    if len(mean) != 3 or len(std) != 3:
        raise JudgeLoadError(f"{file}: image_mean and image_std must have 3 values, got {mean} and {std}")
    return ImageProcessing(size=size, mean=mean, std=std)  # type: ignore[arg-type]


def _existing_folder(path: str | Path, what: str) -> Path:
    folder = Path(os.path.expanduser(str(path)))
    if not folder.exists():
        raise JudgeLoadError(f"{what} {folder} does not exist")
    if not folder.is_dir():
        raise JudgeLoadError(f"{what} {folder} is not a folder (expected a save_pretrained folder)")
    return folder


def _load_tokenizer(folders: list[Path]):
    from transformers import AutoTokenizer

    for folder in folders:
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            try:
                return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            except Exception as exc:  # transformers raises many types; the user needs the folder
                raise JudgeLoadError(f"could not load the CLIP tokenizer in {folder}: {exc}") from exc
    names = " or ".join(str(f) for f in folders)
    raise JudgeLoadError(
        f"no CLIP tokenizer in {names} (expected tokenizer.json or vocab.json + merges.txt; for PickScore "
        f"pass {key('processor_path')}=PATH, the CLIP-ViT-H-14-laion2B-s32B-b79K processor folder)"
    )


def load_clip(
    clip_path: str | Path,
    processor_path: str | Path | None = None,
    dtype: torch.dtype | None = None,
):
    """Load a CLIPModel, its tokenizer and its image pre-processing from local folders.

    Args:
        clip_path: a CLIPModel folder (``config.json`` + weights, e.g. PickScore_v1), or
            ``builtin:tiny-clip`` for the tiny random CLIP built in code.
        processor_path: a folder with the tokenizer and ``preprocessor_config.json``; defaults to ``clip_path``.
        dtype: dtype of the weights (float32 when ``None``).
    Returns:
        (model, tokenizer, processing): an eval-mode ``CLIPModel`` on CPU, its tokenizer, an :class:`ImageProcessing`.
    Raises:
        JudgeLoadError: naming the folder and what was expected in it.
    """
    from transformers import CLIPModel

    if str(clip_path) == BUILTIN_TINY_CLIP:
        from spotune.models.tiny import build_tiny_clip

        # The tiny CLIP brings its own character-level tokenizer; a processor folder may only change
        # the image pre-processing.
        model, tokenizer = build_tiny_clip()
        size = model.config.vision_config.image_size
        processing = ImageProcessing(size=size)
        if processor_path is not None:
            processing = read_image_processing(_existing_folder(processor_path, "processor folder"), size)
        return model.to(dtype or torch.float32).eval(), tokenizer, processing

    folder = _existing_folder(clip_path, "CLIP model folder")
    if not (folder / "config.json").is_file():
        raise JudgeLoadError(f"CLIP model folder {folder} has no config.json (expected a save_pretrained folder)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise JudgeLoadError(
            f"CLIP model folder {folder} holds no weights (expected one of {', '.join(WEIGHT_FILES)})"
        )
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype or torch.float32)
    except Exception as exc:
        raise JudgeLoadError(f"could not load a CLIPModel from {folder}: {exc}") from exc
    folders = [folder]
    if processor_path is not None:
        folders.insert(0, _existing_folder(processor_path, "processor folder"))
    tokenizer = _load_tokenizer(folders)
    default_size = model.config.vision_config.image_size
    processing = next(
        (read_image_processing(f, default_size) for f in folders if (f / "preprocessor_config.json").is_file()),
        ImageProcessing(size=default_size),
    )
    return model.eval(), tokenizer, processing
