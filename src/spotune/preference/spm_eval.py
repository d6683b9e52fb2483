"""How well a judge agrees with human pair labels at each denoising timestep (SPO's SPM evaluation).

At t = 0 the judge sees the clean images; at t > 0 the decoded x0-predictions of both images noised
to t with one shared noise (see :mod:`spotune.preference.noisy_views`). Two figures per timestep:

* ``accuracy``: decisive pairs only (ties left out); correct when the preferred image scores strictly higher.
* ``accuracy_with_ties``: SPO's own figure (``step_aware_preference_model/trainer/tasks/spm_task.py``),
  ``(p0 > p1) * label_0 + (p0 < p1) * label_1`` averaged over every pair, so a tie (0.5/0.5) counts 0.5
  whenever its two scores differ (0 when they are equal, as in SPO).
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
    """Pairwise accuracy at one timestep: ``correct`` of ``total`` decisive (non-tie) pairs, and ``ties``
    tie pairs of which ``ties_apart`` were scored apart (each worth 0.5 in SPO's figure)."""

    timestep: int
    correct: int
    total: int
    ties: int = 0
    ties_apart: int = 0

    @property
    def accuracy(self) -> float:
        """Decisive pairs only."""
        return self.correct / self.total if self.total else math.nan

    @property
    def accuracy_with_ties(self) -> float:
        """SPO's figure: ties count 0.5 (when scored apart), over all pairs."""
        pairs = self.total + self.ties
        return (self.correct + 0.5 * self.ties_apart) / pairs if pairs else math.nan


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
        [B, 4] long: (correct: the preferred image of a decisive pair scores strictly higher, decisive,
        tie, tie scored apart).
    """
    s0 = judge.score(images_0, captions, timesteps)
    s1 = judge.score(images_1, captions, timesteps)
    label_0, label_1 = label_0.to(s0.device), label_1.to(s0.device)
    decisive = label_0 != label_1
    tie = ~decisive
    correct = ((s0 > s1) & (label_0 > label_1)) | ((s1 > s0) & (label_1 > label_0))
    return torch.stack([correct & decisive, decisive, tie, tie & (s0 != s1)], dim=-1).long()


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
        gather: applied to each [B, 4] result before counting (``accelerator.gather_for_metrics`` when
            the batches are split across processes).
        progress: show a progress bar.
    Returns:
        One :class:`TimestepAccuracy` per timestep, in the order given.
    """
    timesteps = [int(t) for t in timesteps]
    bad = [t for t in timesteps if not 0 <= t < views.num_train_timesteps]
    if bad:
        raise ValueError(f"evaluation timesteps {bad} are outside [0, {views.num_train_timesteps})")
    counts = {t: torch.zeros(4, dtype=torch.long) for t in timesteps}
    for batch in tqdm(batches, desc="SPM evaluation", disable=not progress, leave=False):
        batch = checked_batch(batch)
        b = len(batch)
        for t in timesteps:
            ts = torch.full((b,), t, dtype=torch.long, device=views.device)
            if t == 0 and getattr(views, "clean_view_at_zero", True):
                images_0, images_1 = batch.pixel_values_0, batch.pixel_values_1  # the clean images, as SPO
            else:
                images_0, images_1 = views(batch.pixel_values_0, batch.pixel_values_1, batch.captions, ts, generator)
            result = pair_correctness(judge, images_0, images_1, batch.captions, ts, batch.label_0, batch.label_1)
            if gather is not None:
                result = gather(result)
            counts[t] += result.sum(0).cpu()
    return [TimestepAccuracy(t, *(int(c) for c in counts[t])) for t in timesteps]


def format_accuracy_table(rows: list[TimestepAccuracy]) -> str:
    """A Markdown table: timestep, accuracy (ties left out), correct / decisive pairs, SPO's figure with ties."""
    fmt = lambda v: "n/a" if math.isnan(v) else f"{v:.4f}"  # noqa: E731
    lines = ["| t | accuracy | correct / pairs | with ties as 0.5 (SPO's) | ties |", "| ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.timestep} | {fmt(r.accuracy)} | {r.correct} / {r.total} | {fmt(r.accuracy_with_ties)} | {r.ties} |")
    return "\n".join(lines)


CSV_FIELDS = ("step", "timestep", "accuracy", "correct", "total", "accuracy_with_ties", "ties", "ties_apart")


def accuracy_csv(history: list[tuple[int | None, TimestepAccuracy]]) -> str:
    """CSV text of (optimizer step, row) pairs with the columns of :data:`CSV_FIELDS` (step empty when None)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for step, r in history:
        writer.writerow(["" if step is None else step, r.timestep, f"{r.accuracy:.6f}", r.correct, r.total,
                         f"{r.accuracy_with_ties:.6f}", r.ties, r.ties_apart])
    return out.getvalue()

