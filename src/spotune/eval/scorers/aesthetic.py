"""LAION improved aesthetic predictor v2: a linear head on L2-normalised CLIP ViT-L/14 image embeddings.

Published pipeline: OpenAI CLIP's pre-processing (shortest side to 224 bicubic, centre crop,
normalise), ``encode_image`` (= transformers' pooled vision output through ``visual_projection``),
L2 normalisation, then the head of ``sac+logos+ava1-l14-linearMSE.pth`` (a plain state dict).
Scores run roughly from 1 to 10; SD1.5 averages about 5.4 on the paper's prompts.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from spotune.eval.preprocess import CLIP_MEAN, CLIP_STD, resize_shortest_center_crop, to_normalized_tensor
from spotune.eval.scorers.base import (
    Scorer,
    WeightFormatError,
    WeightSpec,
    load_state_dict_file,
    require_path,
    resolve_device,
    resolve_dtype,
)
from spotune.eval.scorers.clip_common import clip_image_embeds, load_clip_model
from spotune.eval.scorers.mlp_head import LinearStackHead

WEIGHTS = (
    WeightSpec(
        "head_path",
        "sac+logos+ava1-l14-linearMSE.pth",
        "the GitHub repository christophschuhmann/improved-aesthetic-predictor",
    ),
    WeightSpec(
        "clip_path",
        "the CLIP ViT-L/14 CLIPModel (config.json + weights)",
        "the Hugging Face hub repo openai/clip-vit-large-patch14",
        kind="dir",
    ),
)


class AestheticScorer(Scorer):
    """head(normalize(CLIP image embedding)); the prompt is not used."""

    name = "aesthetic"

    def __init__(self, clip_model, head: LinearStackHead, batch_size: int = 16, device=None) -> None:
        super().__init__(batch_size, device)
        self.clip_model = clip_model
        self.head = head.to(self.device)
        self.image_size = int(clip_model.config.vision_config.image_size)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        crops = [resize_shortest_center_crop(im, self.image_size) for im in images]
        pixel_values = to_normalized_tensor(crops, CLIP_MEAN, CLIP_STD)  # [B, 3, 224, 224]
        embeds = F.normalize(clip_image_embeds(self.clip_model, pixel_values).float(), dim=-1)  # [B, 768]
        return self.head(embeds.to(self.device))


def load_aesthetic(
    head_path: str | Path | None = None,
    clip_path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
) -> AestheticScorer:
    """The LAION aesthetic predictor from its ``.pth`` head and a local CLIP ViT-L/14 folder."""
    head_file = require_path("aesthetic", head_path, WEIGHTS[0])
    clip_dir = require_path("aesthetic", clip_path, WEIGHTS[1])
    head = LinearStackHead.from_state_dict(load_state_dict_file(head_file, "aesthetic"), str(head_file))
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    clip_model = load_clip_model(clip_dir, "aesthetic", dev, dt)
    embed_dim = int(clip_model.config.projection_dim)
    if head.layers[0].in_features != embed_dim:
        raise WeightFormatError(
            f"scorer 'aesthetic': the head {head_file} takes {head.layers[0].in_features}-d embeddings but the "
            f"CLIP model in {clip_dir} produces {embed_dim}-d ones (the published head needs CLIP ViT-L/14, 768-d)"
        )
    return AestheticScorer(clip_model, head, batch_size=batch_size, device=dev)
