"""How well a judge agrees with human pair labels at each denoising timestep (SPO's SPM evaluation).

At t = 0 the judge sees the clean images; at t > 0 the decoded x0-predictions of both images noised
to t with one shared noise (see :mod:`spotune.preference.noisy_views`). A pair counts as correct when
the image the labels prefer scores strictly higher; ties (0.5/0.5) are left out.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from spotune.data.pickapic import PairBatch, checked_batch
from spotune.preference.clip_judge import ClipStyleJudge
from spotune.preference.noisy_views import NoisyViewMaker

SPM_EVAL_TIMESTEPS = (0, 251, 501, 701, 951)


@dataclass(frozen=True)
class TimestepAccuracy:
    """Pairwise accuracy at one timestep: ``correct`` of ``total`` decisive (non-tie) pairs."""

    timestep: int
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else math.nan


@torch.no_grad()
def pair_correctness(
    judge: ClipStyleJudge,
    images_0: torch.Tensor,
    images_1: torch.Tensor,
    captions: list[str],
    timesteps: torch.Tensor,
    label_0: torch.Tensor,
    label_1: torch.Tensor,
) -> torch.Tensor:
    """Score both images of B pairs and compare with the labels.

    Args:
        images_0, images_1: [B, 3, H, W] in [-1, 1].
        timesteps: [B] timesteps the judge is told.
        label_0, label_1: [B] labels.
    Returns:
        [B, 2] long: column 0 is 1 where the preferred image scores strictly higher, column 1 is 1 for
        decisive (non-tie) pairs.
    """
    s0 = judge.score(images_0, captions, timesteps)
    s1 = judge.score(images_1, captions, timesteps)
    label_0, label_1 = label_0.to(s0.device), label_1.to(s0.device)
    decisive = label_0 != label_1
    correct = ((s0 > s1) & (label_0 > label_1)) | ((s1 > s0) & (label_1 > label_0))
    return torch.stack([correct & decisive, decisive], dim=-1).long()


@torch.no_grad()
def evaluate_pair_accuracy(
    judge: ClipStyleJudge,
    views: NoisyViewMaker,
    batches: Iterable[PairBatch],
    timesteps: Iterable[int] = SPM_EVAL_TIMESTEPS,
    generator: torch.Generator | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
) -> list[TimestepAccuracy]:
    """Pairwise accuracy of ``judge`` at each timestep over all ``batches``.

    Args:
        judge: any CLIP-style judge (a step-aware model, or PickScore as the baseline).
        views: builds the noisy x0-prediction views with the diffusion model.
        batches: collated preference pairs (a DataLoader of :func:`collate_pairs`).
        timesteps: SPO evaluates at 0, 251, 501, 701, 951.
        generator: draws the views' noise; seed it for a measurement that repeats exactly.
        gather: applied to each [B, 2] result before counting (``accelerator.gather_for_metrics`` when
            the batches are split across processes).
        progress: show a progress bar.
    Returns:
        One :class:`TimestepAccuracy` per timestep, in the order given.
    """
    timesteps = [int(t) for t in timesteps]
    bad = [t for t in timesteps if not 0 <= t < views.num_train_timesteps]
    if bad:
        raise ValueError(f"evaluation timesteps {bad} are outside [0, {views.num_train_timesteps})")
    counts = {t: torch.zeros(2, dtype=torch.long) for t in timesteps}
    for batch in tqdm(batches, desc="SPM evaluation", disable=not progress, leave=False):
        batch = checked_batch(batch)
        b = len(batch)
        for t in timesteps:
            ts = torch.full((b,), t, dtype=torch.long, device=views.device)
            if t == 0:
                images_0, images_1 = batch.pixel_values_0, batch.pixel_values_1  # the clean images, as SPO
            else:
                images_0, images_1 = views(batch.pixel_values_0, batch.pixel_values_1, batch.captions, ts, generator)
            result = pair_correctness(judge, images_0, images_1, batch.captions, ts, batch.label_0, batch.label_1)
            if gather is not None:
                result = gather(result)
            counts[t] += result.sum(0).cpu()
    return [TimestepAccuracy(t, int(counts[t][0]), int(counts[t][1])) for t in timesteps]


def format_accuracy_table(rows: list[TimestepAccuracy]) -> str:
    """A Markdown table: timestep, accuracy, correct / decisive pairs."""
    lines = ["| t | accuracy | correct / pairs |", "| ---: | ---: | ---: |"]
    for r in rows:
        acc = "n/a" if math.isnan(r.accuracy) else f"{r.accuracy:.4f}"
        lines.append(f"| {r.timestep} | {acc} | {r.correct} / {r.total} |")
    return "\n".join(lines)


CSV_FIELDS = ("step", "timestep", "accuracy", "correct", "total")


def accuracy_csv(history: list[tuple[int | None, TimestepAccuracy]]) -> str:
    """CSV text of (optimizer step, row) pairs with the columns of :data:`CSV_FIELDS` (step empty when None)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for step, r in history:
        writer.writerow(["" if step is None else step, r.timestep, f"{r.accuracy:.6f}", r.correct, r.total])
    return out.getvalue()

