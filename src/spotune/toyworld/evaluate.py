"""Before/after measurement in the miniature world: same prompts, same seeds, exact metrics.

Every model (the base, and the base with each trained LoRA) renders the same evaluation captions from
the same starting noise (:mod:`spotune.toyworld.sampling`), with deterministic DDIM (eta 0), so
image i of two models differs only through the models. Each image is measured with the exact
metrics of :mod:`spotune.toyworld.metrics` and scored by the preference model; a model's aesthetic
win rate over the base counts the same-seed pairs in which its image has the higher aesthetic score
(a tie, e.g. both perfect, counts as half).

*Layout drift* (:func:`layout_drift`) is how far a model moves the subject away from where the base
put it from the same noise: per image, the absolute change of the subject's size (its share of the
image) and the distance between the two subjects' centroids, in pixels. The paper claims SPO keeps
the layout while it improves aesthetics; drift near 0 is that claim, measured.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spotune.eval.stats import Summary, WinRate, summarize, win_rate
from spotune.toyworld.metrics import AESTHETIC_COMPONENTS, ImageScores, score_images
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
        aesthetic = summarize(self.scores.aesthetic.tolist())
        return {
            "aesthetic": aesthetic.mean,
            "aesthetic_ci": [aesthetic.ci_low, aesthetic.ci_high],
            **{f"aesthetic_{name}": float(getattr(self.scores, name).mean()) for name in AESTHETIC_COMPONENTS},
            "alignment": float(self.scores.aligned.mean()),
            "alignment_shape": float(self.scores.shape_ok.mean()),
            "alignment_colour": float(self.scores.colour_ok.mean()),
            "alignment_background": float(self.scores.background_ok.mean()),
            "subject_size": float(self.scores.object_fraction.mean()),
            "preference_score": float(self.judge_scores.mean()),
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class LayoutDrift:
    """Same-seed layout change of a model against the base, per image.

    Attributes:
        size: [B] |object_fraction(model) - object_fraction(base)| (share of the image's pixels; an
            image without an object has size 0).
        position: [M] distance in pixels between the two images' subject centroids, over the M <= B
            image pairs in which both images show an object (a centroid needs one).
    """

    size: np.ndarray
    position: np.ndarray

    def summary(self) -> dict[str, float | int | list[float | None] | None]:
        """Mean absolute change with its Student-t 95% interval; ``None`` (JSON null, which strict JSON
        readers accept where they refuse NaN) when there are too few values for it."""
        out: dict[str, float | int | list[float | None] | None] = {}
        for key, values in (("size", self.size), ("position_px", self.position)):
            s = _mean_interval(values)
            out[f"layout_drift_{key}"] = _finite_or_none(s.mean)
            out[f"layout_drift_{key}_ci"] = [_finite_or_none(s.ci_low), _finite_or_none(s.ci_high)]
        out["layout_drift_position_pairs"] = int(len(self.position))
        return out


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _mean_interval(values: np.ndarray) -> Summary:
    if len(values) == 0:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan)
    return summarize(values.tolist())


def position_change(model: ImageScores, base: ImageScores) -> np.ndarray:
    """[B] distance in pixels between same-seed subjects' centroids; NaN where either image shows none."""
    if len(model.object_fraction) != len(base.object_fraction):
        raise ValueError(f"{len(model.object_fraction)} images against {len(base.object_fraction)} base images")
    return np.hypot(model.centroid_x - base.centroid_x, model.centroid_y - base.centroid_y)


def layout_drift(model: ImageScores, base: ImageScores) -> LayoutDrift:
    """Per-image layout change of ``model`` against ``base`` (same prompts and seeds, same order)."""
    position = position_change(model, base)
    size = np.abs(model.object_fraction - base.object_fraction)
    return LayoutDrift(size=size, position=position[~np.isnan(position)])


@dataclass
class Comparison:
    """A fine-tuned model against the base on the same prompts and seeds."""

    name: str
    aesthetic: WinRate
    preference: WinRate
    alignment_change: float  # points (percentage points), model minus base
    drift: LayoutDrift | None = None

    def to_dict(self) -> dict:
        out = {
            "aesthetic_win_rate": self.aesthetic.rate,
            "aesthetic_win_rate_ci": [self.aesthetic.ci_low, self.aesthetic.ci_high],
            "aesthetic_wins_ties_losses": [self.aesthetic.wins, self.aesthetic.ties, self.aesthetic.losses],
            "preference_win_rate": self.preference.rate,
            "alignment_change_points": self.alignment_change,
        }
        if self.drift is not None:
            out.update(self.drift.summary())
        return out


def compare(model: ModelResult, base: ModelResult) -> Comparison:
    return Comparison(
        name=model.name,
        aesthetic=win_rate(model.scores.aesthetic.tolist(), base.scores.aesthetic.tolist()),
        preference=win_rate(model.judge_scores.tolist(), base.judge_scores.tolist()),
        alignment_change=100.0 * float(model.scores.aligned.mean() - base.scores.aligned.mean()),
        drift=layout_drift(model.scores, base.scores),
    )


def win_outcomes(model: np.ndarray, base: np.ndarray, tie_tolerance: float = 1e-5) -> np.ndarray:
    """[B] per-image outcomes of ``model`` against ``base``: 1 a win, 0.5 a tie, 0 a loss (as :func:`win_rate`)."""
    tol = tie_tolerance * np.maximum(1.0, np.maximum(np.abs(model), np.abs(base)))
    return np.where(np.abs(model - base) <= tol, 0.5, np.where(model > base, 1.0, 0.0))


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
def evaluate_model(name: str, unet, pipe, judge, evalset: EvaluationSet, on_x0_prediction=None) -> ModelResult:
    """Render ``evalset`` with ``unet`` (and the pipeline's other parts), then measure and judge it.

    ``on_x0_prediction`` sees the sampler's x0-predictions (see :func:`spotune.toyworld.sampling.generate`).
    """
    import time

    t0 = time.perf_counter()
    images = generate(
        unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, evalset.captions, evalset.seeds,
        num_inference_steps=evalset.num_inference_steps, guidance_scale=evalset.guidance_scale,
        batch_size=evalset.batch_size, on_x0_prediction=on_x0_prediction,
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
