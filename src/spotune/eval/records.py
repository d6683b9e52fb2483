"""Finding the images to score: generate output, single model folders, or plain folders of PNGs.

Accepted for each path given to ``spotune eval``:

* a generation root (sub-folders with ``generation.json``): one model per sub-folder;
* a model folder with ``metadata.jsonl`` (what ``spotune generate`` writes): one model;
* any folder of PNG images carrying a webui ``parameters`` chunk (webui, ComfyUI exports and
  spotune all write it): one model named after the folder; the prompt and seed come from the chunk.

Each image becomes an :class:`ImageItem` whose ``key`` pairs it with the other models' images:
``00012-003`` (prompt 12, image 3) for generate output, the file name for plain folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spotune.errors import SpotuneError
from spotune.generation.layout import (
    GENERATION_FILE,
    METADATA_FILE,
    image_key,
    model_folders,
    read_generation,
    read_metadata,
)
from spotune.generation.pnginfo import parse_parameters, read_parameters

IMAGE_SUFFIXES = (".png",)


class ImageFolderError(SpotuneError, ValueError):
    """An image folder that cannot be evaluated (no images, no prompts, duplicate model names)."""


@dataclass(frozen=True)
class ImageItem:
    """One image to score and what it is paired on."""

    model: str
    key: str
    path: Path
    prompt: str
    seed: int | None = None
    category: str | None = None
    prompt_index: int | None = None
    image_index: int | None = None


def _from_metadata(folder: Path, name: str) -> list[ImageItem]:
    items = []
    for record in read_metadata(folder):
        path = folder / record["file"]
        if not path.is_file():
            raise ImageFolderError(f"{folder / METADATA_FILE} lists {record['file']}, which does not exist")
        p, i = record.get("prompt_index"), record.get("image_index")
        key = image_key(p, i) if isinstance(p, int) and isinstance(i, int) else path.stem
        items.append(
            ImageItem(name, key, path, record["prompt"], record.get("seed"), record.get("category"), p, i)
        )
    if not items:
        raise ImageFolderError(f"{folder / METADATA_FILE} lists no images")
    return items


def _from_png_parameters(folder: Path) -> list[ImageItem]:
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise ImageFolderError(
            f"{folder} holds no PNG images and no {METADATA_FILE} (expected `spotune generate` output or PNGs "
            "with a webui 'parameters' chunk)"
        )
    items = []
    for file in files:
        try:
            text = read_parameters(file)
        except OSError as exc:
            raise ImageFolderError(f"{file}: not a readable image ({exc})") from None
        if not text:
            raise ImageFolderError(
                f"{file}: no prompt for this image: it has no 'parameters' text chunk and {folder} has no "
                f"{METADATA_FILE}"
            )
        params = parse_parameters(text)
        if not params["prompt"]:
            raise ImageFolderError(f"{file}: the 'parameters' chunk holds no prompt")
        seed = params.get("Seed")
        items.append(ImageItem(folder.name, file.stem, file, params["prompt"], int(seed) if seed and seed.isdigit() else None))
    return items


def collect_images(paths: list[str | Path]) -> dict[str, list[ImageItem]]:
    """Model name -> its images, in the order the paths (and ``base`` first within a root) give them."""
    models: dict[str, list[ImageItem]] = {}

    def add(name: str, items: list[ImageItem], where: Path) -> None:
        if name in models:
            raise ImageFolderError(
                f"two image folders are both named '{name}' (the second is {where}); model names must differ"
            )
        models[name] = items

    if not paths:
        raise ImageFolderError("no image folders given")
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise ImageFolderError(f"image folder {path} does not exist or is not a folder")
        if (path / METADATA_FILE).is_file():
            generation = read_generation(path) or {}
            name = str(generation.get("name") or path.resolve().name)
            add(name, _from_metadata(path, name), path)
            continue
        subfolders = model_folders(path)
        if subfolders:
            for sub in subfolders:
                if not (sub / METADATA_FILE).is_file():
                    continue  # a model whose generation has not written any image yet
                name = str((read_generation(sub) or {}).get("name") or sub.name)
                add(name, _from_metadata(sub, name), sub)
            if not any((s / METADATA_FILE).is_file() for s in subfolders):
                raise ImageFolderError(f"{path}: its model folders hold no images yet ({GENERATION_FILE} only)")
            continue
        add(path.resolve().name, _from_png_parameters(path), path)
    return models


def paired_keys(a: list[ImageItem], b: list[ImageItem]) -> list[str]:
    """Keys of images two models share with the same prompt and the same seed (when both seeds are known)."""
    by_key = {item.key: item for item in b}
    keys = []
    for item in a:
        other = by_key.get(item.key)
        if other is None or other.prompt != item.prompt:
            continue
        if item.seed is not None and other.seed is not None and item.seed != other.seed:
            continue
        keys.append(item.key)
    return keys
