"""Measured properties of the miniature world: does its aesthetic show early, and does the judge see it?

SPO's premise is that a step-aware judge can tell, from the x0-prediction of a noisy step, which of
two candidates is heading for the better image. That needs an aesthetic that shows in early
x0-predictions, and a judge that reads it there. Two measurements say whether the world offers both:

* :func:`x0_prediction_aesthetics`: the exact aesthetic (and each component) of the decoded
  x0-predictions of the base model at t = 951, 701, 501 and 251 of its DDIM trajectories, and their
  Pearson correlation with the aesthetic of the final image of the same trajectory;
* :func:`spm_accuracy`: the step-aware preference model's pair accuracy at t in {0, 251, 501, 701, 951}
  on held-out pairs, twice: against the rater's underlying preference (the labels of ``eval.parquet``)
  and against the exact aesthetic alone (the more aesthetic image preferred; equal scores are ties,
  left out), both with ``spotune eval-spm``'s measurement.

The demo records both in its report; the shipped SPM's ``spm.json`` records the second when it is made.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spotune.diffusion.sampler import ddim_sample, decode_latents
from spotune.models.conditioning import Conditioning
from spotune.models.text import encode_prompts
from spotune.preference.spm_eval import SPM_EVAL_TIMESTEPS
from spotune.toyworld.metrics import AESTHETIC_COMPONENTS, ImageScores, score_images
from spotune.toyworld.render import to_uint8
from spotune.toyworld.sampling import initial_noise
from spotune.utils.io import atomic_path

X0_TIMESTEPS = (951, 701, 501, 251)
SPM_ACCURACY_TARGET = 0.65  # at every t <= 701
AESTHETIC_TIE = 1e-6  # aesthetic scores this close are a tie in the aesthetic-only labels
_MEASURES = ("aesthetic", *AESTHETIC_COMPONENTS)


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation, or ``None`` (JSON null) when either side is constant."""
    if len(a) < 2 or float(np.std(a)) == 0.0 or float(np.std(b)) == 0.0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


@torch.no_grad()
def x0_prediction_aesthetics(
    pipe,
    captions: list[str],
    seeds: list[int],
    timesteps: tuple[int, ...] = X0_TIMESTEPS,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    batch_size: int = 96,
) -> dict[str, Any]:
    """The aesthetic of x0-predictions along the base model's deterministic DDIM trajectories.

    Args:
        pipe: the world's pipeline (SD1.5 family).
        captions, seeds: B captions and their starting-noise seeds (as :mod:`spotune.toyworld.sampling`).
        timesteps: the timesteps to measure at (the sampler's nearest step stands in for one it lacks).
    Returns:
        ``{"final": {measure: mean}, "by_timestep": {t: {"mean": {measure: mean}, "corr_with_final":
        {measure: r}}}, "images": B}`` with measures ``aesthetic`` and its three components; the
        correlation pairs each x0-prediction with the final image of its own trajectory.
    """
    if len(captions) != len(seeds):
        raise ValueError(f"{len(captions)} captions but {len(seeds)} seeds")
    pipe.scheduler.set_timesteps(num_inference_steps)
    available = [int(t) for t in pipe.scheduler.timesteps]
    # 20-step DDIM on SD1.5's schedule has every wanted step (951, 901, ..., 1); fewer steps measure the nearest.
    timesteps = tuple(dict.fromkeys(min(available, key=lambda s: abs(s - t)) for t in timesteps))
    unet, vae = pipe.unet, pipe.vae
    size = unet.config.sample_size
    shape = (unet.config.in_channels, size, size)
    negative = Conditioning(encode_prompts(pipe.tokenizer, pipe.text_encoder, [""], unet.device))
    wanted = set(timesteps)
    x0_images: dict[int, list[np.ndarray]] = {t: [] for t in timesteps}
    finals: list[np.ndarray] = []
    for start in range(0, len(captions), batch_size):
        caps, sds = captions[start : start + batch_size], seeds[start : start + batch_size]
        cond = Conditioning(encode_prompts(pipe.tokenizer, pipe.text_encoder, caps, unet.device))
        latents = initial_noise(sds, shape).to(unet.device, unet.dtype) * pipe.scheduler.init_noise_sigma

        def keep(t: int, x0: torch.Tensor) -> None:
            if t in wanted:
                x0_images[t].append(to_uint8(decode_latents(vae, x0, chunk_size=batch_size).float().cpu()))

        final = ddim_sample(unet, pipe.scheduler, cond, negative, latents, num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, on_x0_prediction=keep)
        finals.append(to_uint8(decode_latents(vae, final, chunk_size=batch_size).float().cpu()))
    final_scores = score_images(np.concatenate(finals), captions)
    out: dict[str, Any] = {"images": len(captions), "num_inference_steps": num_inference_steps,
                           "final": {m: float(getattr(final_scores, m).mean()) for m in _MEASURES}, "by_timestep": {}}
    for t in timesteps:
        scores: ImageScores = score_images(np.concatenate(x0_images[t]), captions)
        out["by_timestep"][str(t)] = {
            "mean": {m: float(getattr(scores, m).mean()) for m in _MEASURES},
            "corr_with_final": {m: _pearson(getattr(scores, m), getattr(final_scores, m)) for m in _MEASURES},
        }
    return out


def write_aesthetic_labels(pairs: str | Path, out: str | Path) -> Path:
    """Copy a preference file with its labels replaced by the exact aesthetic's verdict.

    ``pairs`` is a parquet file written by :mod:`spotune.toyworld.preferences` (it has ``aesthetic_0``
    and ``aesthetic_1``). The more aesthetic image gets label 1; scores within ``AESTHETIC_TIE`` are a
    tie (0.5, 0.5), which accuracy leaves out.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(str(pairs))
    if "aesthetic_0" not in table.column_names:
        raise ValueError(f"{pairs}: no aesthetic_0/aesthetic_1 columns (not written by spotune.toyworld.preferences?)")
    a0 = np.asarray(table.column("aesthetic_0").to_pylist(), dtype=np.float64)
    a1 = np.asarray(table.column("aesthetic_1").to_pylist(), dtype=np.float64)
    tie = np.abs(a0 - a1) <= AESTHETIC_TIE
    label_0 = np.where(tie, 0.5, (a0 > a1).astype(np.float64))
    label_1 = np.where(tie, 0.5, 1.0 - label_0)
    table = table.set_column(table.column_names.index("label_0"), "label_0", pa.array(label_0))
    table = table.set_column(table.column_names.index("label_1"), "label_1", pa.array(label_1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, row_group_size=256)
    return out


def spm_accuracy(
    base_model: str | Path,
    pickscore: str | Path,
    spm_checkpoint: str | Path,
    eval_pairs: str | Path,
    work_dir: str | Path,
    timesteps: tuple[int, ...] = SPM_EVAL_TIMESTEPS,
    seed: int = 0,
    guidance_scale: float = 5.0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The SPM's pair accuracy per timestep against the rater and against the aesthetic alone.

    Args:
        base_model: the pipeline that makes the x0-prediction views.
        pickscore, spm_checkpoint: the judge (``judge=spm``).
        eval_pairs: held-out pairs with rater labels (``eval.parquet`` of the preference data).
        work_dir: where the aesthetic-labelled copy of the pairs is written.
    Returns:
        ``{"vs_rater": {t: accuracy}, "vs_aesthetic": {t: accuracy}, "pairs": N, "aesthetic_ties": K,
        "target": 0.65, "meets_target": bool}``; the target is at every t <= 701, and accuracies
        leave ties out (``None`` where no pair was decisive).
    """
    from spotune.recipes.eval_spm import EvalSPMConfig, run_eval_spm

    relabelled = write_aesthetic_labels(eval_pairs, Path(work_dir) / "eval_aesthetic.parquet")
    result: dict[str, Any] = {"timesteps": list(timesteps), "target": SPM_ACCURACY_TARGET}
    for key, data in (("vs_rater", eval_pairs), ("vs_aesthetic", relabelled)):
        config = EvalSPMConfig(
            judge="spm", judge_clip_path=str(pickscore), judge_checkpoint=str(spm_checkpoint),
            pretrained_model=str(base_model), data=str(data), resolution=None, guidance_scale=guidance_scale,
            timesteps=list(timesteps), batch_size=batch_size, num_workers=0, seed=seed, progress=False,
        )
        config.validate()
        rows = run_eval_spm(config)
        result[key] = {str(r.timestep): None if math.isnan(r.accuracy) else r.accuracy for r in rows}
        result[f"{key}_decisive_pairs"] = {str(r.timestep): r.total for r in rows}
        if key == "vs_rater":
            result["pairs"] = rows[0].total + rows[0].ties
        else:
            result["aesthetic_ties"] = rows[0].ties
    early = [result["vs_rater"][str(t)] for t in timesteps if t <= 701]
    result["meets_target"] = bool(early) and all(a is not None and a >= SPM_ACCURACY_TARGET for a in early)
    return result
