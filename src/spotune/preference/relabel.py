"""Relabelling preference pairs with PickScore on the clean images (SPO's SDXL step-aware model).

SPO trains its SDXL step-aware model on Pick-a-Pic with the human labels replaced by PickScore's
(``step_aware_preference_model/trainer/tasks/spm_task.py``, ``update_as_pickscore_label``, switched on by
``sdxl_spm_task_cfg = SPMTaskConfig(use_pickscore_label=True)`` with ``pickscore_threshold = 0.1``). Per
pair, with PickScore's scores ``s_i = logit_scale.exp() * cos(text, image_i)`` of the two *original*
images (the decoded Pick-a-Pic pictures through PickScore's own processor, not the noisy views)::

    (p0, p1) = softmax([s0, s1])
    p0 - p1 >  margin   ->  labels (1, 0)
    p1 - p0 >  margin   ->  labels (0, 1)
    otherwise (|p0 - p1| <= margin)  ->  a tie, labels (0.5, 0.5)

Every pair is relabelled, whatever its human label was: Pick-a-Pic ties, and the training rows without a
human label (``has_label`` false, kept in training), get PickScore's verdict too. The authors relabel in
evaluation as well and score accuracy on PickScore's decisive pairs only.

The captions are tokenised as the judges tokenise them (padded to 77), where the authors' processor pads to
the batch's longest caption: the same text features, since CLIP's causal text tower pools at the end token
and reads nothing after it. The authors recompute the labels every time a pair comes round; the model is frozen, so
:class:`LabelCache` keeps each pair's labels (two floats per pair) and epochs reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from spotune.data.pickapic import PairBatch
from spotune.eval.preprocess import resize_shortest_center_crop, to_normalized_tensor
from spotune.preference.clip_judge import CLIP_MEAN, CLIP_STD, PickScoreJudge

DEFAULT_TIE_MARGIN = 0.1  # SPO's pickscore_threshold


def pickscore_labels(scores_0: torch.Tensor, scores_1: torch.Tensor, margin: float = DEFAULT_TIE_MARGIN) -> torch.Tensor:
    """Pair labels from two scores, as SPO's ``update_as_pickscore_label``.

    Args:
        scores_0, scores_1: [B] PickScore scores (``logit_scale.exp() * cosine``) of image 0 and image 1.
        margin: a pair is a tie when the two-way softmax probabilities differ by at most this much.
    Returns:
        [B, 2] float32 (label_0, label_1): (1, 0), (0, 1) or (0.5, 0.5).
    """
    probs = torch.softmax(torch.stack([scores_0.float(), scores_1.float()], dim=-1), dim=-1)  # [B, 2]
    labels = torch.full_like(probs, 0.5)
    labels[probs[:, 0] - probs[:, 1] > margin] = labels.new_tensor([1.0, 0.0])
    labels[probs[:, 1] - probs[:, 0] > margin] = labels.new_tensor([0.0, 1.0])
    return labels


@dataclass(frozen=True)
class ClipPixels:
    """A PIL image -> [3, S, S] CLIP pixel values, as a transformers CLIP image processor makes them
    (shortest side to S, bicubic; centre crop with floored offsets; [0, 1]; per-channel normalisation).

    Picklable, so DataLoader workers can run it next to the image decoding.
    """

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, image: Image.Image) -> torch.Tensor:
        crop = resize_shortest_center_crop(image, self.size, offset_rounding="transformers")
        return to_normalized_tensor([crop], self.mean, self.std)[0]


class LabelCache:
    """Labels already computed for a dataset's pairs, by dataset index: [N, 2] float32, NaN where unknown.

    Args:
        size: the number of pairs N of the dataset.
    """

    def __init__(self, size: int) -> None:
        self.labels = torch.full((size, 2), float("nan"))

    def missing(self, index: torch.Tensor) -> torch.Tensor:
        """[B] dataset indices -> [B] bool, true where the pair has no labels yet."""
        return torch.isnan(self.labels[index.cpu(), 0])

    def put(self, index: torch.Tensor, labels: torch.Tensor) -> None:
        self.labels[index.cpu()] = labels.detach().float().cpu()

    def get(self, index: torch.Tensor) -> torch.Tensor:
        """[B] indices -> [B, 2] labels (all must be known)."""
        return self.labels[index.cpu()].clone()

    @property
    def known(self) -> int:
        return int((~torch.isnan(self.labels[:, 0])).sum())

    def merge(self, other: torch.Tensor) -> None:
        """Take the labels ``other`` ([N, 2], NaN where unknown) knows and this cache does not."""
        take = torch.isnan(self.labels[:, 0]) & ~torch.isnan(other[:, 0])
        self.labels[take] = other[take].float()


class PickScoreRelabeller:
    """Relabels batches of pairs with a frozen PickScore, caching each pair's labels.

    Args:
        judge: the PickScore judge (PickScore_v1 over the CLIP-ViT-H-14 processor; fp32, as SPO runs it).
        margin: the tie margin on the softmax probabilities (SPO: 0.1).
    """

    def __init__(self, judge: PickScoreJudge, margin: float = DEFAULT_TIE_MARGIN) -> None:
        self.judge = judge
        self.margin = margin

    @classmethod
    def from_pretrained(
        cls, clip_path: str, processor_path: str | None, margin: float, device: torch.device | str | None = None
    ) -> "PickScoreRelabeller":
        # fp32: SPO's relabelling model is loaded without a dtype and is not under the SPM's autocast.
        return cls(PickScoreJudge.from_pretrained(clip_path, processor_path, device=device, dtype=torch.float32), margin)

    @property
    def pixels(self) -> ClipPixels:
        """The pre-processing of the clean images (run in the data workers)."""
        return ClipPixels(self.judge.image_size, self.judge.image_mean, self.judge.image_std)

    @torch.no_grad()
    def labels(self, pixels_0: torch.Tensor, pixels_1: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """[B, 3, S, S] x 2 CLIP pixel values of the clean images and B captions -> [B, 2] labels."""
        prompts = list(captions)
        scores_0 = self.judge.score_pixel_values(pixels_0, prompts)
        scores_1 = self.judge.score_pixel_values(pixels_1, prompts)
        return pickscore_labels(scores_0, scores_1, self.margin)

    def cached_labels(
        self,
        cache: LabelCache,
        index: torch.Tensor,
        pixels_0: torch.Tensor,
        pixels_1: torch.Tensor,
        captions: Sequence[str],
    ) -> torch.Tensor:
        """[B, 2] labels of the pairs at dataset ``index`` ([B] long), computing only those not yet cached."""
        missing = cache.missing(index)
        if missing.any():
            rows = missing.nonzero()[:, 0]
            new = self.labels(pixels_0[rows.to(pixels_0.device)], pixels_1[rows.to(pixels_1.device)],
                              [captions[int(r)] for r in rows])
            cache.put(index.cpu()[rows], new)
        return cache.get(index)

    def relabel_batch(self, batch: PairBatch, cache: LabelCache) -> PairBatch:
        """``batch`` with PickScore's labels of its pairs in place of its own (each pair's computed once).

        The batch must come from a :class:`~spotune.data.pickapic.PickAPicPairs` whose ``clip_pixels`` is
        :attr:`pixels` (it then carries the pairs' dataset indices and the clean images' CLIP pixels).
        """
        if batch.index is None or batch.clip_pixels_0 is None or batch.clip_pixels_1 is None:
            raise ValueError("relabelling needs batches of a PickAPicPairs whose clip_pixels is set (PickScoreRelabeller.pixels)")
        labels = self.cached_labels(cache, batch.index, batch.clip_pixels_0, batch.clip_pixels_1, batch.captions)
        return batch.with_labels(labels)
