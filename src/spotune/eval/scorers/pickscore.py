"""PickScore (and any CLIP-style judge) on PIL images: score = logit_scale.exp() * cosine(text, image).

The formula lives in :class:`spotune.preference.clip_judge.ClipStyleJudge` (the judges SPO trains
with); :class:`ClipJudgeScorer` only turns PIL images into the judge's pixel values the way its
processor does (shortest side to the crop size, bicubic; centre crop; the processor's mean/std) and
calls :meth:`ClipStyleJudge.score_pixel_values`. PickScore_v1 is the CLIP ViT-H/14 fine-tuned on
Pick-a-Pic; the SPM scorer (:mod:`spotune.eval.scorers.spm`) reuses the same class at t = 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from spotune.eval.preprocess import resize_shortest_center_crop, to_normalized_tensor
from spotune.eval.scorers.base import (
    BUILTIN_TINY_CLIP,
    Scorer,
    WeightSpec,
    require_path,
    resolve_device,
    resolve_dtype,
)

WEIGHTS = (
    WeightSpec(
        "model_path",
        "the PickScore_v1 CLIPModel (config.json + model.safetensors)",
        "the Hugging Face hub repo yuvalkirstain/PickScore_v1",
        kind="dir",
    ),
    WeightSpec(
        "processor_path",
        "PickScore's processor (preprocessor_config.json, tokenizer files)",
        "the Hugging Face hub repo laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        kind="dir",
        optional=True,
    ),
)


class ClipJudgeScorer(Scorer):
    """PIL images -> a :class:`ClipStyleJudge`'s score at a fixed timestep (0: final images).

    Args:
        judge: a PickScoreJudge or StepAwarePreferenceModel.
        name: the scorer's name in reports.
        timestep: the timestep passed to the judge (step-aware judges use it; PickScore ignores it).
    """

    def __init__(self, judge, name: str, timestep: int = 0, batch_size: int = 16, device=None) -> None:
        super().__init__(batch_size, device)
        self.judge = judge
        self.name = name
        self.timestep = timestep

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> [B, 3, S, S] as the judge's CLIP image processor makes them."""
        size = self.judge.image_size
        crops = [resize_shortest_center_crop(im, size, offset_rounding="transformers") for im in images]
        return to_normalized_tensor(crops, self.judge.image_mean, self.judge.image_std)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixel_values = self.pixel_values(images)
        timesteps = torch.full((len(images),), self.timestep, device=self.judge.device)
        return self.judge.score_pixel_values(pixel_values, prompts, timesteps)


def load_pickscore(
    model_path: str | Path | None = None,
    processor_path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
) -> ClipJudgeScorer:
    """PickScore from local folders (``model_path="builtin:tiny-clip"``: the tiny random CLIP, for tests).

    Args:
        model_path: the PickScore_v1 model folder.
        processor_path: its processor folder (tokenizer and ``preprocessor_config.json``); may be left
            out when ``model_path`` holds those files too.
    """
    from spotune.preference.clip_judge import PickScoreJudge

    if str(model_path) != BUILTIN_TINY_CLIP:
        model_dir = require_path("pickscore", model_path, WEIGHTS[0])
        has_processor = (model_dir / "preprocessor_config.json").is_file() and any(
            (model_dir / f).is_file() for f in ("tokenizer.json", "vocab.json")
        )
        if processor_path or not has_processor:
            processor_path = require_path("pickscore", processor_path, WEIGHTS[1])
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    judge = PickScoreJudge.from_pretrained(
        str(model_path), str(processor_path) if processor_path else None, device=dev, dtype=dt
    )
    return ClipJudgeScorer(judge, "pickscore", batch_size=batch_size, device=dev)
