"""The sampling tree of one prompt: what a step-wise sampler saw and decided at each step.

SPO's idea is visual: at each step k candidates grow from one x_t, the judge scores their
x0-predictions, a pair is kept when the judge is decisive, and the chain goes on from a random
candidate. A sampler given ``tree_row=p`` records, for prompt p of its batch, one :class:`TreeStep`
per row of that picture; the images are the decoded x0-predictions the pixel judge already has (the
SDXL sampler's inner steps, which are not judged, decode the k images of that prompt alone, for the
tree only). Recording reads what the sampler computed and draws no random numbers, so a round gives
the same pairs with or without it.

``spotune.recipes.trees`` writes a tree as ``RUN/trees/iter-XXXXXXXX.png`` and ``.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from spotune.preference.select import best_worst_gap

# The longer side of a tree's thumbnails: enough to tell candidates apart, small enough that a tree of
# 20 steps x 4 candidates stays a few hundred kilobytes at 512 px.
THUMBNAIL_SIZE = 96


@dataclass
class TreeStep:
    """One row of a sampling tree: the k candidates (or chains) of the recorded prompt at one step.

    Attributes:
        step_index: i, the denoising step whose candidates (or chains) the row shows.
        timestep: t_i, the noise level of the x_t the row's candidates grew from (the chains' own, for the
            SDXL sampler's rows).
        judge_timestep: the timestep the judge scored the row's images at (0 for final latents); ``None``
            for a row that is not judged (the SDXL sampler's inner steps).
        images: [k, 3, h, w] uint8 thumbnails of the candidates' x0-predictions (their final latents at the
            last step).
        scores: k judge scores; ``None`` when the row is not judged.
        gap: ``p_best - p_worst`` of the two-way softmax of the best and worst score; ``None`` when not judged.
        threshold: the gap a pair must exceed to be kept; ``None`` when every pair of the row is kept
            (GradSPO's final SD1.5 step) or the row is not judged.
        kept: whether the row's pair became training tuples; ``None`` when not judged.
        winner, loser: the best and the worst candidate's index; ``None`` when not judged.
        continued: the candidate the chain went on from (the SDXL sampler: the chain the next branch grew
            from); ``None`` where no chain is continued (the last step).
    """

    step_index: int
    timestep: int
    judge_timestep: int | None
    images: torch.Tensor
    scores: list[float] | None = None
    gap: float | None = None
    threshold: float | None = None
    kept: bool | None = None
    winner: int | None = None
    loser: int | None = None
    continued: int | None = None

    def numbers(self) -> dict:
        """The row without its images, for the tree's JSON."""
        return {key: value for key, value in vars(self).items() if key != "images"}


@dataclass
class SamplingTree:
    """The rows of one prompt's tree, in the order of the steps.

    Attributes:
        prompt_row: p, the prompt's index in its sampling batch.
        sampler: which sampler recorded it (``spo``, ``gradspo-sd15``, ``gradspo-sdxl``, ``sdxl``).
        steps: one :class:`TreeStep` per recorded step.
    """

    prompt_row: int
    sampler: str
    steps: list[TreeStep] = field(default_factory=list)

    def judged(
        self,
        step_index: int,
        timestep: torch.Tensor,
        judge_timestep: torch.Tensor,
        images: torch.Tensor,
        scores: torch.Tensor,
        threshold: float | None,
        kept: torch.Tensor,
    ) -> TreeStep:
        """Record a judged row from the whole batch's tensors and return it (``continued`` is set later).

        Args:
            images: [k*b, 3, H, W] decoded x0-predictions, candidate-major (row j*b + p), or [k, 3, H, W] the
                recorded prompt's alone.
            scores: [k, b] their scores. kept: [b] bool, the pairs that became tuples.
            timestep, judge_timestep: scalars (or [k*b], all rows alike) of the row.
        """
        p = self.prompt_row
        k, b = scores.shape
        indices, gap = best_worst_gap(scores[:, p : p + 1])
        row = TreeStep(
            step_index=step_index,
            timestep=_scalar(timestep),
            judge_timestep=_scalar(judge_timestep),
            images=thumbnails(images if images.shape[0] == k else images.view(k, b, *images.shape[1:])[:, p]),
            scores=[float(s) for s in scores[:, p].tolist()],
            gap=float(gap[0]),
            threshold=threshold,
            kept=bool(kept[p]),
            winner=int(indices[0, 0]),
            loser=int(indices[1, 0]),
        )
        self.steps.append(row)
        return row

    def unjudged(self, step_index: int, timestep: torch.Tensor, images: torch.Tensor) -> TreeStep:
        """Record a row that is not judged from the recorded prompt's [k, 3, H, W] decoded images."""
        row = TreeStep(step_index=step_index, timestep=_scalar(timestep), judge_timestep=None, images=thumbnails(images))
        self.steps.append(row)
        return row

    def continued_from(self, choice: torch.Tensor) -> None:
        """Mark the last row's continued candidate from the batch's [b] choices."""
        self.steps[-1].continued = int(choice[self.prompt_row])


def _scalar(t: torch.Tensor) -> int:
    return int(t.reshape(-1)[0])


def thumbnails(images: torch.Tensor, size: int = THUMBNAIL_SIZE) -> torch.Tensor:
    """[n, 3, H, W] images in about [-1, 1] -> [n, 3, h, w] uint8 on the CPU, the longer side at most ``size``.

    Images smaller than half of ``size`` (the tiny test models' 32 px) are enlarged by a whole factor, pixels
    kept square, so a tree of them can still be read.
    """
    images = images.detach().float()
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    if scale < 1:
        images = F.interpolate(images, size=(max(1, round(height * scale)), max(1, round(width * scale))), mode="area")
    elif scale >= 2:
        images = F.interpolate(images, scale_factor=int(scale), mode="nearest")
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
