"""Make a saved diffusers pipeline folder load with transformers 4 as well as 5.

``save_pretrained`` under transformers 5 writes two things transformers 4 cannot use:

* the ``CLIPTextModel`` weights without the ``text_model.`` level in their names: transformers 4
  finds none of its keys and silently initialises the text encoder at random (transformers 5 reads
  both spellings, so the prefixed one serves both);
* the tokenizer as ``tokenizer.json`` only: the slow ``CLIPTokenizer`` that ``model_index.json`` names
  needs ``vocab.json`` and ``merges.txt``, which :func:`write_bpe_files` derives from it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from safetensors import safe_open

from spotune.export.source import ExportError
from spotune.utils.io import atomic_path, atomic_save_safetensors, atomic_write_text

TEXT_MODEL_PREFIX = "text_model."
# Architectures whose transformers-4 checkpoints hold every weight under ``text_model.``.
_PREFIXED_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")
# The header line transformers' slow BPE tokenizers skip when they read merges.txt.
MERGES_HEADER = "#version: 0.2"


def prefix_text_model_keys(folder: Path) -> None:
    """Rename the weights of a saved ``CLIPTextModel`` folder to ``text_model.<name>`` (in place).

    ``text_projection`` of ``CLIPTextModelWithProjection`` sits beside ``text_model`` in both
    versions, so it keeps its name. Sharded checkpoints have their index renamed too.
    """
    config_file = folder / "config.json"
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{config_file}: cannot read the text encoder's config ({exc})") from exc
    if not any(a in _PREFIXED_ARCHITECTURES for a in architectures):
        return

    def renamed(key: str) -> str:
        if key.startswith(TEXT_MODEL_PREFIX) or key.startswith("text_projection."):
            return key
        return TEXT_MODEL_PREFIX + key

    for file in sorted(folder.glob("*.safetensors")):
        mode = file.stat().st_mode
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {renamed(k): handle.get_tensor(k) for k in handle.keys()}
        atomic_save_safetensors(tensors, file, metadata)
        os.chmod(file, stat.S_IMODE(mode))  # as save_pretrained left it, not the temporary file's 0600
    for index_file in folder.glob("*.safetensors.index.json"):
        mode = index_file.stat().st_mode
        index = json.loads(index_file.read_text())
        index["weight_map"] = {renamed(k): v for k, v in index.get("weight_map", {}).items()}
        atomic_write_text(index_file, json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.chmod(index_file, stat.S_IMODE(mode))


def bpe_file_texts(vocab: Mapping[str, int], merges: Iterable[Sequence[str] | str]) -> tuple[str, str]:
    """The texts of ``vocab.json`` (token -> id, in id order) and ``merges.txt`` (header, one pair a line)."""
    ordered = dict(sorted(vocab.items(), key=lambda item: item[1]))
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return json.dumps(ordered, ensure_ascii=False), "\n".join([MERGES_HEADER, *lines]) + "\n"


def write_bpe_files(folder: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` beside the ``tokenizer.json`` of a saved BPE tokenizer.

    Both come from the BPE model inside ``tokenizer.json``, so the slow tokenizer and the fast one
    encode alike. Nothing is written when the slow files are already there.
    """
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return
    source = folder / "tokenizer.json"
    try:
        model = json.loads(source.read_text(encoding="utf-8"))["model"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise ExportError(f"{source}: cannot read the tokenizer to write vocab.json and merges.txt ({exc})") from exc
    if model.get("type") != "BPE":
        raise ExportError(f"{source}: the tokenizer model is {model.get('type')!r}, not the BPE model CLIP's tokenizer uses")
    vocab_text, merges_text = bpe_file_texts(model["vocab"], model.get("merges") or [])
    mode = stat.S_IMODE(source.stat().st_mode)  # readable by whoever may read tokenizer.json
    for name, text in (("vocab.json", vocab_text), ("merges.txt", merges_text)):
        write_utf8(folder / name, text)
        os.chmod(folder / name, mode)


def write_utf8(path: Path, text: str) -> None:
    """Atomically write ``text`` as UTF-8 whatever the locale (the BPE alphabet is not ASCII)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))


def make_folder_loadable_everywhere(folder: Path) -> None:
    """Apply both fixes to a pipeline folder written by ``save_pretrained``: every text encoder and
    tokenizer it holds (SD1.5: ``text_encoder``/``tokenizer``; SDXL adds ``text_encoder_2``/``tokenizer_2``)."""
    for name in ("text_encoder", "text_encoder_2"):
        if (folder / name).is_dir():
            prefix_text_model_keys(folder / name)
    for name in ("tokenizer", "tokenizer_2"):
        if (folder / name / "tokenizer.json").is_file():
            write_bpe_files(folder / name)


# SD1.5's tokenizer settings (CLIP ViT-L/14): 77 positions, padded with end-of-text, lower-cased.
CLIP_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": "<|startoftext|>",
    "do_lower_case": True,
    "eos_token": "<|endoftext|>",
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}
CLIP_SPECIAL_TOKENS = {k: CLIP_TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}


def write_clip_tokenizer_folder(
    folder: Path, vocab: Mapping[str, int], merges: Iterable[Sequence[str] | str], pad_token: str = "<|endoftext|>"
) -> None:
    """A ``tokenizer/`` folder that transformers 4 (slow or fast) and 5 load as SD1.5's ``CLIPTokenizer``.

    Args:
        folder: where to write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
            ``special_tokens_map.json`` (created if missing).
        vocab: token -> id (49408 entries for CLIP).
        merges: the BPE merges in priority order (48894 pairs for CLIP).
        pad_token: what pads to 77 positions: end-of-text for CLIP ViT-L (SD1.5, SDXL's first tokenizer),
            ``"!"`` for SDXL's second tokenizer (OpenCLIP pads with id 0, which is "!").
    """
    folder.mkdir(parents=True, exist_ok=True)
    vocab_text, merges_text = bpe_file_texts(vocab, merges)
    write_utf8(folder / "vocab.json", vocab_text)
    write_utf8(folder / "merges.txt", merges_text)
    config = {**CLIP_TOKENIZER_CONFIG, "pad_token": pad_token}
    special = {**CLIP_SPECIAL_TOKENS, "pad_token": pad_token}
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2, sort_keys=True) + "\n")
