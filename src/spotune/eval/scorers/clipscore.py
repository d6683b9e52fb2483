"""CLIPScore: 100 * max(cosine(text, image), 0) with a named CLIP model (text-image alignment)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from spotune.eval.preprocess import resize_shortest_center_crop, to_normalized_tensor
from spotune.eval.scorers.base import BUILTIN_TINY_CLIP, Scorer, WeightSpec, require_path, resolve_device, resolve_dtype
from spotune.eval.scorers.clip_common import clip_image_embeds, clip_text_embeds, tokenize_clip

WEIGHTS = (
    WeightSpec(
        "model_path",
        "a transformers CLIPModel with its tokenizer and preprocessor_config.json (e.g. clip-vit-large-patch14)",
        "the Hugging Face hub repo openai/clip-vit-large-patch14 (or any CLIP checkpoint you name)",
        kind="dir",
    ),
)


class ClipScoreScorer(Scorer):
    """100 * max(cos, 0) between the CLIP text and image embeddings.

    Args:
        model, tokenizer: a transformers CLIPModel and its tokenizer.
        processing: its image pre-processing (size, mean, std), see :mod:`spotune.preference.loading`.
    """

    name = "clipscore"

    def __init__(self, model, tokenizer, processing, batch_size: int = 16, device=None) -> None:
        super().__init__(batch_size, device)
        self.model, self.tokenizer, self.processing = model, tokenizer, processing

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        size = self.processing.size
        crops = [resize_shortest_center_crop(im, size, offset_rounding="transformers") for im in images]
        pixel_values = to_normalized_tensor(crops, self.processing.mean, self.processing.std)  # [B, 3, S, S]
        image = F.normalize(clip_image_embeds(self.model, pixel_values).float(), dim=-1)  # [B, E]
        ids = tokenize_clip(self.tokenizer, prompts, self.model.config.text_config.max_position_embeddings)
        text = F.normalize(clip_text_embeds(self.model, ids).float(), dim=-1)  # [B, E]
        return 100.0 * (image * text).sum(-1).clamp(min=0.0)


def load_clipscore(
    model_path: str | Path | None = None,
    processor_path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
) -> ClipScoreScorer:
    """CLIPScore with the CLIP model in ``model_path`` (tokenizer and processing from ``processor_path`` or the same folder)."""
    from spotune.preference.loading import load_clip

    if str(model_path) != BUILTIN_TINY_CLIP:
        require_path("clipscore", model_path, WEIGHTS[0])
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    model, tokenizer, processing = load_clip(str(model_path), str(processor_path) if processor_path else None, dt)
    model = model.to(device=dev, dtype=dt).eval().requires_grad_(False)
    return ClipScoreScorer(model, tokenizer, processing, batch_size=batch_size, device=dev)
