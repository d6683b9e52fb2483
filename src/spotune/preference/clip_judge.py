"""CLIP-style judges: score = logit_scale.exp() * cos(text features, image features).

:class:`ClipStyleJudge` holds what every CLIP-based judge shares (pre-processing of [-1, 1] images,
tokenisation, a per-prompt cache of text features, the scoring formula). :class:`PickScoreJudge`
is the plain, timestep-blind judge; the step-aware model subclasses the base and conditions the
image tower on the timestep.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel

from spotune.utils.clip_pixels import CLIP_MEAN, CLIP_STD  # re-exported for the judges' users


def preprocess_images(
    images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Turn decoded images into CLIP pixel values on tensors, exactly as SPO's judge does during sampling.

    Shortest side resized to ``size`` (bicubic, no antialiasing, sizes rounded half up), centre crop
    (offsets rounded as torchvision's ``CenterCrop``), [-1, 1] -> [0, 1], clamp, normalise. Matching
    SPO here matters: official step-aware checkpoints were trained and used with this pipeline.

    Args:
        images: [B, 3, H, W] in [-1, 1] (VAE output; may overshoot slightly).
        size: the processor's crop size (224 for PickScore).
        mean, std: the processor's per-channel normalisation.
    Returns:
        [B, 3, size, size] normalised pixel values, same dtype as ``images``.
    """
    x = images.float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    x = (x[..., top : top + size, left : left + size] / 2 + 0.5).clamp(0.0, 1.0)
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).to(images.dtype)


def spm_training_pixels(
    images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Turn noisy views into CLIP pixel values in the order SPO's SPM trainer uses (not the sampling path).

    ``step_aware_preference_model/trainer/tasks/spm_task.py``: [-1, 1] -> [0, 1] and clamp, bicubic resize
    straight to ``size`` x ``size`` (no antialiasing, no crop: the views are square), clamp again (bicubic
    overshoots), normalise. :func:`preprocess_images` (sampling) instead resizes the unclamped image,
    crops, then clamps; the two differ where a view leaves [-1, 1], as x0-predictions of noisy steps do.

    Args:
        images: [B, 3, R, R] views in about [-1, 1].
        size: the processor's crop size (224 for PickScore).
        mean, std: the processor's per-channel normalisation.
    Returns:
        [B, 3, size, size] float32 normalised pixel values.
    """
    x = (images.float() / 2 + 0.5).clamp(0.0, 1.0)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = x.clamp(0.0, 1.0)
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


class ClipStyleJudge(nn.Module):
    """Shared machinery of CLIP-based judges; subclasses define the two feature functions.

    Args:
        tokenizer: the CLIP tokenizer of the text tower.
        image_size: the processor's crop size.
        image_mean, image_std: the processor's normalisation.
        text_cache_size: how many prompts' text features to keep (a chain reuses its prompts).
    """

    def __init__(
        self,
        tokenizer,
        image_size: int,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        text_cache_size: int = 4096,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size

    # -- to be provided by subclasses -------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S], [B] -> [B, D] projected image features (not normalised)."""
        raise NotImplementedError

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, D] projected text features (not normalised)."""
        raise NotImplementedError

    def logit_scale(self) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """[B] captions -> [B, 77] input ids (padded and truncated to the tokenizer's max length)."""
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids.to(self.device)

    @torch.no_grad()
    def cached_text_features(self, prompts: list[str]) -> torch.Tensor:
        """[B] captions -> [B, D], computing each distinct caption once while it stays cached."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            feats = self.text_features(self.tokenize(missing))
            for prompt, feat in zip(missing, feats):
                self._text_cache[prompt] = feat
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        out = torch.stack([self._text_cache[p] for p in prompts])
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return out

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    def score(
        self,
        images: torch.Tensor,
        prompts: list[str] | torch.Tensor,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """logit_scale.exp() * cosine(text, image) for each image.

        Args:
            images: [B, 3, H, W] in [-1, 1].
            prompts: B captions, or [B, L] input ids.
            timesteps: [B] timesteps (ignored by timestep-blind judges); 0 when omitted.
        Returns:
            [B] float32 scores.
        """
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        # In the judge's dtype from here on: fp16 images from an fp16 VAE reach an fp32 judge as fp32 pixels.
        pixel_values = preprocess_images(images.to(self.dtype), self.image_size, self.image_mean, self.image_std)
        return self.score_pixel_values(pixel_values, prompts, timesteps)

    def score_pixel_values(
        self,
        pixel_values: torch.Tensor,
        prompts: list[str] | torch.Tensor,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The same score on images already turned into CLIP pixel values.

        This is the entry for PIL images: the evaluation scorers run the model's own image
        processor (PickScore's, for instance) and pass its output here, so the formula lives once.

        Args:
            pixel_values: [B, 3, S, S] normalised pixel values, S = ``image_size``.
            prompts: B captions, or [B, L] input ids.
            timesteps: [B] timesteps (ignored by timestep-blind judges); 0 when omitted.
        Returns:
            [B] float32 scores, computed in the judge's own dtype with autocast off.
        """
        if timesteps is None:
            timesteps = torch.zeros(pixel_values.shape[0], device=pixel_values.device)
        if len(prompts) != pixel_values.shape[0]:
            raise ValueError(f"got {pixel_values.shape[0]} images but {len(prompts)} prompts")
        # The judge computes in its own weights' dtype, outside any autocast the caller has on (a
        # sampling loop under fp16 autocast, say): SPO's judge runs in fp32, and scores are 100 x cosine
        # compared through a 0.3 softmax gap, so half-precision error can flip near-threshold pairs.
        with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=False):
            if isinstance(prompts, torch.Tensor):
                text = self.text_features(prompts.to(self.device))
            else:
                text = self.cached_text_features(list(prompts))
            image = self.image_features(pixel_values.to(self.device, self.dtype), timesteps.to(self.device))
            text = F.normalize(text.float(), dim=-1)
            image = F.normalize(image.float(), dim=-1)
            return self.logit_scale().exp().float() * (text * image).sum(-1)


class PickScoreJudge(ClipStyleJudge):
    """Plain PickScore (or any CLIP): judges every step as if it were a final image.

    Args:
        model: a transformers :class:`CLIPModel` (PickScore_v1 weights for the real thing).
        tokenizer, image_size, image_mean, image_std: from the model's processor.
    """

    def __init__(self, model: CLIPModel, tokenizer, image_size: int | None = None, **kwargs) -> None:
        size = image_size or model.config.vision_config.image_size
        super().__init__(tokenizer, size, **kwargs)
        self.model = model.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        clip_path: str,
        processor_path: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> "PickScoreJudge":
        """Load PickScore (or any CLIPModel) from a local folder, ready to judge.

        Args:
            clip_path: a CLIPModel folder (PickScore_v1), or ``builtin:tiny-clip``.
            processor_path: folder with the tokenizer and ``preprocessor_config.json`` (default: ``clip_path``).
            device, dtype: where and in what precision to put the weights (CPU, float32 by default).
        Raises:
            spotune.preference.loading.JudgeLoadError: a missing folder, weights or tokenizer (named).
        """
        from spotune.preference.loading import load_clip

        model, tokenizer, processing = load_clip(clip_path, processor_path, dtype)
        judge = cls(model, tokenizer, processing.size, image_mean=processing.mean, image_std=processing.std)
        return judge.to(device=device, dtype=dtype or torch.float32).eval()

    def image_features(self, pixel_values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        out = self.model.vision_model(pixel_values=pixel_values)
        return self.model.visual_projection(out.pooler_output)

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model.text_model(input_ids=input_ids)
        return self.model.text_projection(out.pooler_output)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale
