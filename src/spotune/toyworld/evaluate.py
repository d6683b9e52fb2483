"""Before/after measurement in the miniature world: same prompts, same seeds, exact metrics.

Every model (the base, and the base with each trained LoRA) renders the same held-out captions from
the same starting noise (:mod:`spotune.toyworld.sampling`), with deterministic DDIM (eta 0), so
image i of two models differs only through the models. Each image is measured with the exact
metrics of :mod:`spotune.toyworld.metrics` and scored by the preference model; a model's aesthetic
win rate over the base counts the same-seed pairs in which its image is the cleaner one (a tie,
e.g. both perfectly clean, counts as half).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spotune.eval.stats import WinRate, summarize, win_rate
from spotune.toyworld.metrics import ImageScores, score_images
from spotune.toyworld.render import to_uint8
from spotune.toyworld.sampling import generate


@dataclass
class ModelResult:
    """Measurements of one model's images (length-B arrays, same order as the captions and seeds)."""

    name: str
    images: np.ndarray  # [B, H, W, 3] uint8
    scores: ImageScores
    judge_scores: np.ndarray  # [B] the preference model's score at t = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        aesthetic = summarize(self.scores.cleanliness.tolist())
        return {
            "aesthetic": aesthetic.mean,
            "aesthetic_ci": [aesthetic.ci_low, aesthetic.ci_high],
            "alignment": float(self.scores.aligned.mean()),
            "alignment_shape": float(self.scores.shape_ok.mean()),
            "alignment_colour": float(self.scores.colour_ok.mean()),
            "alignment_background": float(self.scores.background_ok.mean()),
            "subject_size": float(self.scores.object_fraction.mean()),
            "preference_score": float(self.judge_scores.mean()),
            "seconds": self.seconds,
        }


@dataclass
class Comparison:
    """A fine-tuned model against the base on the same prompts and seeds."""

    name: str
    aesthetic: WinRate
    preference: WinRate
    alignment_change: float  # points (percentage points), model minus base

    def to_dict(self) -> dict:
        return {
            "aesthetic_win_rate": self.aesthetic.rate,
            "aesthetic_win_rate_ci": [self.aesthetic.ci_low, self.aesthetic.ci_high],
            "aesthetic_wins_ties_losses": [self.aesthetic.wins, self.aesthetic.ties, self.aesthetic.losses],
            "preference_win_rate": self.preference.rate,
            "alignment_change_points": self.alignment_change,
        }


def compare(model: ModelResult, base: ModelResult) -> Comparison:
    return Comparison(
        name=model.name,
        aesthetic=win_rate(model.scores.cleanliness.tolist(), base.scores.cleanliness.tolist()),
        preference=win_rate(model.judge_scores.tolist(), base.judge_scores.tolist()),
        alignment_change=100.0 * float(model.scores.aligned.mean() - base.scores.aligned.mean()),
    )


def unet_with_lora(base_unet, checkpoint: str | Path):
    """A copy of ``base_unet`` carrying the LoRA of an SPO run or checkpoint folder (adapter enabled)."""
    from spotune.checkpoint import load_weights, read_state, resolve_checkpoint
    from spotune.models.lora import add_lora, load_lora_state_dict

    folder = resolve_checkpoint(checkpoint)
    state = read_state(folder)
    kind, weights = load_weights(folder)
    unet = copy.deepcopy(base_unet)
    if kind != "lora":
        unet.load_state_dict(weights)
        return unet.eval()
    lora = state["lora"]
    add_lora(unet, lora["rank"], lora["alpha"], lora["targets"], lora["init"])
    load_lora_state_dict(unet, {k: v.to(unet.dtype) for k, v in weights.items()}, source=str(folder / "lora.safetensors"))
    return unet.eval()


@dataclass
class EvaluationSet:
    """The captions and seeds every model renders."""

    captions: list[str]
    seeds: list[int]
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    batch_size: int = 96
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def evaluate_model(name: str, unet, pipe, judge, evalset: EvaluationSet) -> ModelResult:
    """Render ``evalset`` with ``unet`` (and the pipeline's other parts), then measure and judge it."""
    import time

    t0 = time.perf_counter()
    images = generate(
        unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, evalset.captions, evalset.seeds,
        num_inference_steps=evalset.num_inference_steps, guidance_scale=evalset.guidance_scale,
        batch_size=evalset.batch_size,
    )
    judged = []
    for start in range(0, len(images), 256):
        chunk = images[start : start + 256]
        judged.append(judge.score(chunk.to(judge.device), evalset.captions[start : start + 256],
                                  torch.zeros(len(chunk), dtype=torch.long)).cpu())
    pixels = to_uint8(images)
    return ModelResult(
        name=name,
        images=pixels,
        scores=score_images(pixels, evalset.captions),
        judge_scores=torch.cat(judged).numpy(),
        seconds=time.perf_counter() - t0,
    )
