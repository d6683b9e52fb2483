"""Loading a transformers CLIP model from a local folder, its embeddings, and CLIP tokenisation.

The embedding helpers call the towers and projections directly rather than ``get_*_features``,
whose return type changed between transformers 4 (a tensor) and 5 (an output object).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPModel

from spotune.eval.scorers.base import WeightFormatError


def load_clip_model(folder: Path, scorer: str, device: torch.device, dtype: torch.dtype) -> CLIPModel:
    """A :class:`CLIPModel` saved with ``save_pretrained`` in ``folder``, in eval mode, frozen."""
    if not (folder / "config.json").is_file():
        raise WeightFormatError(
            f"scorer '{scorer}': {folder} holds no config.json (expected a transformers CLIPModel folder: "
            "config.json and model.safetensors or pytorch_model.bin)"
        )
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise WeightFormatError(f"scorer '{scorer}': could not load a CLIPModel from {folder} ({exc})") from exc
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_clip_tokenizer(folder: Path, scorer: str):
    """The CLIP tokenizer saved in ``folder`` (vocab.json + merges.txt, or tokenizer.json)."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise WeightFormatError(
            f"scorer '{scorer}': {folder} holds no CLIP tokenizer (expected vocab.json + merges.txt or tokenizer.json)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise WeightFormatError(f"scorer '{scorer}': no CLIP tokenizer could be read from {folder} ({exc})") from exc


def clip_image_embeds(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] -> [B, E] projected image embeddings (not normalised)."""
    out = model.vision_model(pixel_values=pixel_values.to(model.device, model.dtype))
    return model.visual_projection(out.pooler_output)


def clip_text_embeds(model: CLIPModel, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, E] projected text embeddings (not normalised)."""
    out = model.text_model(input_ids=input_ids.to(model.device))
    return model.text_projection(out.pooler_output)


def tokenize_clip(tokenizer, prompts: list[str], max_length: int = 77) -> torch.Tensor:
    """[B] captions -> [B, max_length] ids, truncated and padded as the CLIP scorers do."""
    max_length = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)
    return tokenizer(
        prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    ).input_ids
